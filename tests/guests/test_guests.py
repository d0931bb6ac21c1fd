"""Guest recipes: the newc writer, the Debian fetcher, module dependency
resolution and the default guest image."""

import gzip
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.guests import debian, default, initramfs, kmod
from pyvmm.guests.initramfs import Initramfs, parse_newc


# ---------------------------------------------------------------- cpio writer

def _independent_newc_reader(blob: bytes) -> dict:
    """A second, deliberately naive newc reader (not the module's own), so a
    writer bug is not mirrored by the reader."""
    out = {}
    pos = 0
    while True:
        assert pos % 4 == 0, "member not 4-byte aligned"
        assert blob[pos:pos + 6] == b"070701"
        nums = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16)
                for i in range(13)]
        namesize, filesize = nums[11], nums[6]
        name = blob[pos + 110: pos + 110 + namesize]
        assert name.endswith(b"\0")
        name = name[:-1].decode()
        data_at = (pos + 110 + namesize + 3) & ~3
        data = blob[data_at: data_at + filesize]
        if name == "TRAILER!!!":
            assert filesize == 0
            return out
        out[name] = dict(ino=nums[0], mode=nums[1], nlink=nums[4],
                         mtime=nums[5], rdev=(nums[9], nums[10]), data=data)
        pos = (data_at + filesize + 3) & ~3


def _sample(order_reversed=False) -> Initramfs:
    ops = [
        lambda i: i.add_file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
        lambda i: i.add_file("etc/odd", b"12345", 0o600),     # unaligned size
        lambda i: i.add_file("/etc/empty", b""),
        lambda i: i.add_symlink("bin/sh", "/bin/busybox"),
        lambda i: i.add_device("dev/sda", "b", 8, 0),
        lambda i: i.add_dir("proc", 0o555),
        lambda i: i.add_basic_devices(),
    ]
    img = Initramfs()
    for op in (reversed(ops) if order_reversed else ops):
        op(img)
    return img


def test_cpio_layout_round_trip():
    blob = _sample().to_bytes()
    got = _independent_newc_reader(blob)
    assert got["bin/hello"]["data"] == b"#!/bin/sh\necho hi\n"
    assert got["bin/hello"]["mode"] == stat.S_IFREG | 0o755
    assert got["etc/odd"]["data"] == b"12345"
    assert got["etc/odd"]["mode"] == stat.S_IFREG | 0o600
    assert got["etc/empty"]["data"] == b""
    assert got["bin/sh"]["mode"] == stat.S_IFLNK | 0o777
    assert got["bin/sh"]["data"] == b"/bin/busybox"
    assert got["dev/console"]["mode"] == stat.S_IFCHR | 0o600
    assert got["dev/console"]["rdev"] == (5, 1)
    assert got["dev/null"]["rdev"] == (1, 3)
    assert got["dev/hvc0"]["rdev"] == (229, 0)
    assert stat.S_ISBLK(got["dev/sda"]["mode"])
    assert got["dev/sda"]["rdev"] == (8, 0)
    assert got["proc"]["mode"] == stat.S_IFDIR | 0o555
    # implicit parents, listed before their children
    names = list(got)
    for n in names:
        if "/" in n:
            parent = n.rsplit("/", 1)[0]
            assert parent in got and names.index(parent) < names.index(n)
    assert got["bin"]["mode"] == stat.S_IFDIR | 0o755
    # distinct inode numbers
    assert len({e["ino"] for e in got.values()}) == len(got)
    # the module's reader agrees
    mine = {e.name: e for e in parse_newc(blob)}
    assert set(mine) == set(got)
    assert all(mine[n].data == got[n]["data"] and mine[n].mode == got[n]["mode"]
               for n in got)


def test_cpio_deterministic_and_gzip():
    a, b = _sample(), _sample(order_reversed=True)
    assert a.to_bytes() == b.to_bytes()
    gz1, gz2 = a.to_bytes(compress=True), b.to_bytes(compress=True)
    assert gz1 == gz2 and gz1[:2] == b"\x1f\x8b"
    assert gzip.decompress(gz1) == a.to_bytes()
    assert {e.name for e in parse_newc(gz1)} == \
        {e.name for e in parse_newc(a.to_bytes())}
    # every timestamp is the fixed one
    assert {e["mtime"] for e in _independent_newc_reader(a.to_bytes())
            .values()} == {initramfs.DEFAULT_MTIME}


def test_cpio_tool_extracts_it(tmp_path):
    """GNU cpio (an independent implementation) accepts the archive; as
    root it also creates the device nodes."""
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.fail("cpio not installed (apt-get install cpio)")
    arc = tmp_path / "a.cpio"
    arc.write_bytes(_sample().to_bytes())
    out = tmp_path / "x"
    out.mkdir()
    with open(arc, "rb") as f:
        r = subprocess.run([cpio, "-idm", "--quiet", "--no-absolute-filenames"],
                           stdin=f, cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "bin/hello").stat().st_mode) == 0o755
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    if os.geteuid() == 0:
        st = os.lstat(out / "dev/console")
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)
        st = os.lstat(out / "dev/hvc0")
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (229, 0)


def test_cpio_rejects_bad_input():
    img = Initramfs()
    with pytest.raises(ValueError):
        img.add_file("../etc/passwd", b"x")
    with pytest.raises(ValueError):
        img.add_device("dev/x", "q", 1, 1)
    img.add_file("a", b"file")
    with pytest.raises(ValueError):      # a file cannot be a parent
        img.add_file("a/b", b"x")
    blob = _sample().to_bytes()
    for bad in (blob[:50], blob[:len(blob) // 2], b"070702" + blob[6:],
                b"garbage" * 20):
        with pytest.raises(ValueError):
            parse_newc(bad)


# ---------------------------------------------------------------- Debian

def test_fetch_busybox_static_runs():
    bb = debian.busybox_static(progress=False)
    r = subprocess.run([str(bb), "echo", "hi"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "hi\n"
    # statically linked: no program interpreter in the ELF header
    data = bb.read_bytes()
    assert data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data[:4096]


def test_fetch_deb_fresh_cache_progress_then_cached(tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    root = debian.fetch_deb("busybox-static")
    assert root == tmp_path / "debian" / "busybox-static"
    assert (root / "bin" / "busybox").is_file()
    err = capsys.readouterr().err
    assert "pyvmm: fetching busybox-static" in err and "done in" in err
    assert not list((tmp_path / "debian").glob(".busybox-static.*/"))

    # Second call: no apt, no output.
    def no_apt(*a, **k):
        raise AssertionError("apt was run for a cached package")
    monkeypatch.setattr(debian, "_run", no_apt)
    assert debian.fetch_deb("busybox-static") == root
    assert capsys.readouterr().err == ""


def test_debian_errors(monkeypatch):
    for bad in ("", "Busybox", "x; rm -rf /", "-o", "a b"):
        with pytest.raises(debian.DebianError, match="invalid"):
            debian.fetch_deb(bad)
    # Unknown package: one-line error (apt-get update skipped here).
    monkeypatch.setattr(debian, "_updated", True)
    with pytest.raises(debian.DebianError, match="unknown to apt") as ei:
        debian.fetch_deb("pyvmm-no-such-package-xyz")
    assert "\n" not in str(ei.value)
    # Missing tool.
    monkeypatch.setattr(debian.shutil, "which", lambda tool: None)
    with pytest.raises(debian.DebianError, match="apt-cache not found"):
        debian.resolve_package("linux-image-cloud-amd64")


def test_apt_update_offline_and_timeout(monkeypatch):
    """$PYVMM_OFFLINE (the faithful L1): apt-get update is not even tried;
    an update that hangs ends with one line instead of hanging pyvmm."""
    ran = []
    monkeypatch.setattr(debian, "_run", lambda cmd, **kw: ran.append((cmd, kw)))
    monkeypatch.setenv(debian.OFFLINE_ENV, "1")
    monkeypatch.setattr(debian, "_updated", False)
    with pytest.raises(debian.DebianError, match="PYVMM_OFFLINE is set"):
        debian._apt_update(progress=False)
    assert ran == []

    def hang(cmd, **kw):
        ran.append(kw.get("timeout"))
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    monkeypatch.setattr(debian, "_run", hang)
    monkeypatch.setenv(debian.OFFLINE_ENV, "0")
    monkeypatch.setattr(debian, "_updated", False)
    with pytest.raises(debian.DebianError, match="did not finish") as ei:
        debian._apt_update(progress=False)
    assert ran == [debian.APT_UPDATE_TIMEOUT_S] and "\n" not in str(ei.value)


def test_failed_download_retried_after_update(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    monkeypatch.setattr(debian, "_updated", False)
    updates, real = [], debian._download

    def flaky(package, workdir, size, progress):
        if not updates:
            raise debian.DebianError("download of x failed: 404 Not Found")
        return real(package, workdir, size, progress)

    def fake_update(progress):
        updates.append(1)
        debian._updated = True
    monkeypatch.setattr(debian, "_download", flaky)
    monkeypatch.setattr(debian, "_apt_update", fake_update)
    root = debian.fetch_deb("busybox-static", progress=False)
    assert updates == [1] and (root / "bin" / "busybox").is_file()
    # after one update a failure is final, with a one-line message
    monkeypatch.setattr(debian, "_download", lambda *a: (_ for _ in ()).throw(
        debian.DebianError("download of busybox failed: 404")))
    shutil.rmtree(root)
    with pytest.raises(debian.DebianError, match="404"):
        debian.fetch_deb("busybox-static", progress=False)


def test_find_system_map_skips_debians_stub(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    version = "6.1.0-99-cloud-amd64"
    boot = tmp_path / "boot"
    boot.mkdir()
    kernel = debian.KernelFiles(vmlinuz=boot / f"vmlinuz-{version}", modules_dir=tmp_path,
                                version=version, config=boot / f"config-{version}")
    own = boot / f"System.map-{version}"
    own.write_text("ffffffff81000000 T _stext\n")
    assert debian.find_system_map(kernel, fetch=False) == own
    own.write_text("ffffffffffffffff B The real System.map is in the linux-image-x-dbg package\n")
    assert debian.find_system_map(kernel, fetch=False) is None
    cached = debian.debian_cache() / f"System.map-{version}"
    cached.parent.mkdir(parents=True)
    cached.write_text("ffffffff81000000 T _stext\n")
    assert debian.find_system_map(kernel, fetch=False) == cached
    assert debian.find_system_map(version=version, fetch=False) == cached
    # a -dbg package that cannot be had: a warning and no map, no leftovers
    cached.unlink()
    monkeypatch.setattr(debian, "_download", lambda *a: (_ for _ in ()).throw(
        debian.DebianError("download of x failed: 404")))
    assert debian.find_system_map(kernel, progress=False) is None
    assert "404" in caplog.text and list(debian.debian_cache().iterdir()) == []


def test_no_disk_space_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    Free = type("U", (), {"free": 1000})
    monkeypatch.setattr(debian.shutil, "disk_usage", lambda p: Free)
    with pytest.raises(debian.DebianError, match="no disk space"):
        debian.fetch_deb("busybox-static", progress=False)


def test_resolve_and_cloud_kernel_is_bzimage():
    pkg = debian.resolve_package(debian.CLOUD_KERNEL_META, progress=False)
    assert pkg.startswith("linux-image-6.") and pkg.endswith("-cloud-amd64")
    generic = debian.resolve_package(debian.GENERIC_KERNEL_META,
                                     progress=False)
    assert generic.endswith("-amd64") and "cloud" not in generic
    # a package that is not a metapackage resolves to itself
    assert debian.resolve_package("busybox-static", progress=False) == \
        "busybox-static"
    k = debian.cloud_kernel(progress=False)
    assert pkg == f"linux-image-{k.version}"
    head = k.vmlinuz.read_bytes()[:0x210]
    assert head[0x1FE:0x200] == b"\x55\xaa"         # boot sector signature
    assert head[0x202:0x206] == b"HdrS"             # x86 boot protocol
    cfg = k.config.read_text()
    assert "CONFIG_XEN_PV=y" in cfg and "CONFIG_HVC_XEN=y" in cfg
    assert (k.modules_dir / "kernel").is_dir()


# ---------------------------------------------------------------- modules

def test_module_dependency_order():
    k = debian.cloud_kernel(progress=False)
    idx = kmod.ModuleIndex(k.modules_dir)
    # A module with a multi-level dependency chain in Debian's 6.1 kernels.
    target = "camellia-aesni-avx2"
    order = idx.load_order([target])
    assert order[-1] == "camellia_aesni_avx2"
    assert len(order) >= 3
    for i, name in enumerate(order):
        for dep in idx.depends(name):
            assert order.index(dep) < i, (dep, name)
    with pytest.raises(kmod.ModuleError):
        idx.load_order(["no-such-module"])


def test_compressed_module_and_bad_elf(tmp_path):
    k = debian.cloud_kernel(progress=False)
    idx = kmod.ModuleIndex(k.modules_dir)
    src = idx.path("xen-netfront")
    raw = src.read_bytes()
    tree = tmp_path / "m" / "kernel" / "drivers" / "net"
    tree.mkdir(parents=True)
    (tree / "xen-netfront.ko.xz").write_bytes(
        lzma.compress(raw, format=lzma.FORMAT_XZ))
    small = kmod.ModuleIndex(tmp_path / "m")
    p = small.path("xen_netfront")
    assert p.name == "xen-netfront.ko.xz"
    assert kmod.module_bytes(p) == raw
    assert kmod.modinfo(raw)["name"] == ["xen_netfront"]
    assert small.load_order(["xen-netfront"]) == ["xen_netfront"]
    bad = tmp_path / "bad.ko.xz"
    bad.write_bytes(b"not xz at all")
    with pytest.raises(kmod.ModuleError):
        kmod.module_bytes(bad)
    # Section table pointing past the end of the file.
    broken = bytearray(raw[:64])
    struct.pack_into("<Q", broken, 0x28, 1 << 40)
    with pytest.raises(kmod.ModuleError):
        kmod.modinfo(bytes(broken))


# ---------------------------------------------------------------- default guest

def test_default_command_lines_keep_an_idle_guest_asleep():
    """The options that stop an idle Linux guest's periodic wake-ups (issue
    8) are on both default command lines: the default guest's and the one
    `pyvmm --xen-pv KERNEL` uses without --cmdline."""
    from pyvmm import cli
    idle = default.IDLE_CMDLINE.split()
    assert set(idle) == {"tsc=nowatchdog", "sysctl.vm.compaction_proactiveness=0", "psi=0", "nowatchdog"}
    for line in (default.DEFAULT_CMDLINE, cli.DEFAULT_CMDLINE):
        assert set(idle) <= set(line.split()), line


def test_default_guest_image():
    g = default.build_default_guest(progress=False)
    assert g.cmdline == default.DEFAULT_CMDLINE and "console=hvc0" in g.cmdline
    head = g.kernel.read_bytes()[:0x210]
    assert head[0x202:0x206] == b"HdrS"
    blob = g.initrd.read_bytes()
    assert blob[:2] == b"\x1f\x8b"
    entries = {e.name: e for e in parse_newc(blob)}

    init = entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    script = init.data.decode()
    assert script.startswith("#!/bin/sh") and default.BANNER in script
    bb = entries["bin/busybox"]
    assert bb.data == debian.busybox_static(progress=False).read_bytes()
    for applet in ("bin/sh", "sbin/insmod", "bin/mount", "usr/bin/setsid",
                   "bin/cttyhack"):
        e = entries[applet]
        assert stat.S_ISLNK(e.mode) and e.data == b"/bin/busybox", applet
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["dev/hvc0"].rdev == (229, 0)

    mod_dir = f"lib/modules/{g.kernel_version}/"
    kos = {n.rsplit("/", 1)[-1]: e for n, e in entries.items()
           if n.startswith(mod_dir) and n.endswith(".ko")}
    assert "xen-blkfront.ko" in kos and "xen-netfront.ko" in kos
    # every module is a loadable plain ELF and all dependencies are present
    names = {kmod.module_name(n) for n in kos}
    assert set(g.modules) == names
    for ko in kos.values():
        deps = kmod.modinfo(ko.data).get("depends", [""])[0]
        assert {d for d in deps.split(",") if d} <= names
    # /init loads them in dependency order (dependencies first)
    path_of = {kmod.module_name(n): n for n in entries
               if n.startswith(mod_dir) and n.endswith(".ko")}
    positions = [script.index(f"load /{path_of[m]}\n") for m in g.modules]
    assert positions == sorted(positions)

    # busybox's own shell accepts the script
    r = subprocess.run([str(debian.busybox_static(progress=False)), "sh", "-n",
                        "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_default_guest_cached(capsys):
    g1 = default.build_default_guest(progress=True)
    capsys.readouterr()
    m1 = g1.initrd.stat().st_mtime_ns
    g2 = default.build_default_guest(progress=True)
    assert g2 == g1 and g2.initrd.stat().st_mtime_ns == m1
    assert "building initramfs" not in capsys.readouterr().err


# ---------------------------------------------------------------- extra programs

def test_elf_info_of_a_host_program_and_bad_input(tmp_path):
    from pyvmm.guests import bundle
    info = bundle.elf_info(Path(os.path.realpath(sys.executable)))
    assert info.interpreter and info.interpreter.endswith(".so.2")
    assert "libc.so.6" in info.needed or any(n.startswith("libpython") for n in info.needed)
    for bad in (b"", b"#!/bin/sh\n", b"\x7fELF\x02\x01" + b"\xff" * 58):
        f = tmp_path / "bad"
        f.write_bytes(bad)
        with pytest.raises(debian.DebianError):
            bundle.elf_info(f)


def test_bundle_resolves_libraries_from_packages_before_the_host(tmp_path):
    """_resolve: a soname fetched wins over the host's, the host fills in the
    rest transitively, one nobody has is reported missing, the loader is
    not copied as a library."""
    from pyvmm.guests import bundle
    host = bundle.host_libraries()
    assert "libc.so.6" in host
    prog = Path(os.path.realpath("/bin/ls"))
    fetched = {"libc.so.6": host["libc.so.6"]}
    missing, libs, interp = bundle._resolve([prog], fetched, host)
    assert not missing and interp == bundle.elf_info(prog).interpreter
    assert libs["libc.so.6"] == host["libc.so.6"] and Path(interp).name not in libs
    missing, libs, _ = bundle._resolve([prog], {}, {})
    assert missing == set(bundle.elf_info(prog).needed) and not libs


def test_extra_files_are_an_appended_initramfs_layer(tmp_path, monkeypatch):
    """build_default_guest(extra_files=): the default image unchanged, then a
    second gzip newc archive with the files (modes kept), cached by content."""
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    base_img = Initramfs()
    base_img.add_file("init", b"#!/bin/sh\n", mode=0o755)
    base = tmp_path / "base.img"
    base_img.write(base)
    tool = tmp_path / "tool"
    tool.write_bytes(b"\x7fELF pretend")
    tool.chmod(0o755)
    lib = tmp_path / "libx.so.1"
    lib.write_bytes(b"library")
    lib.chmod(0o644)
    extra = {"usr/bin/tool": tool, "usr/lib/x86_64-linux-gnu/libx.so.1": lib}
    out = default._with_layer(base, extra, progress=False)
    blob = out.read_bytes()
    assert blob.startswith(base.read_bytes())
    layer = {e.name: e for e in parse_newc(blob[len(base.read_bytes()):])}
    assert layer["usr/bin/tool"].data == tool.read_bytes()
    assert layer["usr/bin/tool"].mode & 0o777 == 0o755
    assert layer["usr/lib/x86_64-linux-gnu/libx.so.1"].mode & 0o777 == 0o644
    assert default._with_layer(base, extra, progress=False) == out      # cached
    lib.write_bytes(b"another library")
    assert default._with_layer(base, extra, progress=False) != out      # keyed by content
    with pytest.raises(debian.DebianError):
        default._with_layer(base, {"usr/bin/gone": tmp_path / "gone"}, progress=False)
