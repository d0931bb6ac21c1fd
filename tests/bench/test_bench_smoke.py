"""Smoke test of bench/boot.py's machinery (no figure is asserted): a PV test
guest boots through it and the table shows that boot; the QEMU path is fed
by a stand-in "QEMU" script; the milestone scanner is checked on its own."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from pyvmm.guests.testguests import build_testguest
from repo import REPO

BENCH = REPO / "bench" / "boot.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_boot", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


boot = _load_bench()


def test_milestones_found_across_chunk_boundaries():
    ticks = iter(range(100))
    w = boot.MilestoneWatch(b"GUEST READY", clock=lambda: next(ticks))
    w.feed(b"[0.0] Linux ver")
    w.feed(b"sion 6.1 ...\nRun /init as ")
    assert "linux" in w.seen and "init" not in w.seen
    w.feed(b"init process\nGUEST")
    w.feed(b" READY\n")
    assert list(w.seen) == ["linux", "init", "banner"]
    assert w.seen["linux"] < w.seen["init"] < w.seen["banner"]
    w.feed(b"Linux version again")      # only the first sighting counts
    assert w.seen["linux"] == 1


def test_summary_medians_and_partial_boots():
    boots = [{"end": "poweroff", "milestones": {"linux": 1.0, "init": 4.0}, "exit_counts": {"a": 10, "b": 2}},
             {"end": "poweroff", "milestones": {"linux": 3.0}, "exit_counts": {"a": 20}},
             {"end": "timeout", "milestones": {"linux": 2.0, "init": 6.0}, "exit_counts": {"b": 4}}]
    s = boot.summarize(boots)
    assert s["median"]["linux"] == 2.0 and s["median"]["init"] == 5.0
    assert s["reached"] == {"linux": 3, "init": 2, "banner": 0, "poweroff": 0}
    assert s["exits"] == 12
    assert list(s["exit_reasons"]) == ["a", "b"] and s["exit_reasons"]["a"] == 10


@pytest.mark.faithful
def test_benchmark_runs_a_test_guest_and_prints_its_table():
    kernel = build_testguest("hello")
    p = subprocess.run([sys.executable, str(BENCH), "--lanes", "host", "--runs", "2",
                        "--kernel", str(kernel), "--memory", "16M", "--timeout", "60"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    # table rows start "host (<kvm module>)  <system>"
    rows = [parts for parts in map(str.split, p.stdout.splitlines())
            if parts[:1] == ["host"] and parts[1].startswith("(kvm") and parts[2] == "pyvmm"]
    assert len(rows) == 1, p.stdout
    row = rows[0]
    # hello prints through console_io and powers off: no Linux milestone,
    # a poweroff time, and its exits counted
    assert row.count("not") == 3 and row[-1] == "poweroff", p.stdout
    assert "console_io:write" in p.stdout and "sched_op:shutdown 1" in p.stdout
    assert "pyvmm boot 2/2" in p.stderr      # progress on stderr


@pytest.mark.faithful
def test_json_report_has_exit_counts_by_reason():
    kernel = build_testguest("hello")
    p = subprocess.run([sys.executable, str(BENCH), "--lanes", "host", "--runs", "1", "--json",
                        "--kernel", str(kernel), "--memory", "16M", "--timeout", "60"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    lane = rep["lanes"]["host"]
    (b,) = lane["pyvmm"]["boots"]
    assert b["end"] == "poweroff"
    assert set(b["milestones"]) == {"poweroff"}
    assert 0 < b["milestones"]["poweroff"] <= b["wall"] + 1e-6
    assert b["exit_counts"]["sched_op:shutdown"] == 1
    assert b["exit_counts"]["console_io:write"] >= 1
    assert lane["pyvmm"]["exits"] == sum(b["exit_counts"].values())
    assert "skipped" in lane["qemu"]


FAKE_QEMU = """\
    import sys, time
    print("early stuff", flush=True)
    time.sleep(0.2)
    sys.stdout.write("[0.1] Linux vers"); sys.stdout.flush(); time.sleep(0.1)
    print("ion 6.1.0", flush=True)
    time.sleep(0.2)
    print("Run /init as init process", flush=True)
    if "{mode}" == "hang":
        time.sleep(60)
    print("{banner}: Linux 6.1", flush=True)
    print("reboot: Power down", flush=True)
"""


@pytest.mark.parametrize("mode", ["poweroff", "hang"])
def test_qemu_path_with_a_stand_in(tmp_path, mode):
    script = tmp_path / "fake_qemu.py"
    script.write_text(textwrap.dedent(FAKE_QEMU.format(mode=mode, banner=boot.banner_marker().decode())))
    r = boot.qemu_boot([sys.executable, str(script)], timeout=5)
    m = r["milestones"]
    assert m["linux"] >= 0.2 and m["init"] >= m["linux"] + 0.15
    if mode == "poweroff":
        assert r["end"] == "poweroff" and m["poweroff"] >= m["banner"] >= m["init"]
    else:
        assert r["end"].startswith("timeout") and "banner" not in m and "poweroff" not in m
        assert r["wall"] < 15


def test_printk_clock_of_each_milestone_line():
    console = (b"[    0.000000] Linux version 6.1.0 (gcc)\n[    1.5] other\n"
               b"[   12.345678] Run /init as init process\n" + boot.banner_marker() + b": Linux\n")
    t = boot.printk_times(console, boot.banner_marker())
    assert t == {"linux": 0.0, "init": 12.345678}     # the banner line has no stamp


def test_devices_table_ratios_and_missing_rows():
    spec = importlib.util.spec_from_file_location(
        "bench_devices", REPO / "bench" / "devices.py")
    devices = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(devices)
    t = devices.table({"size_mb": 64, "disk_read_guest_s": 4.0, "disk_read_host_s": 0.04,
                       "disk_write_guest_s": 8.0, "disk_write_host_s": 0.5})
    lines = t.splitlines()
    assert lines[0].split()[-1] == "guest/host"
    assert lines[1].split()[-3:] == ["16.0", "1600.0", "0.010"]
    assert lines[2].split()[-3:] == ["8.0", "128.0", "0.062"]
    assert len(lines) == 3                     # no network row without its figures
    # with costs: per MiB, the steady state (less the 0-byte run), the back-end's work
    t = devices.table({"size_mb": 4, "disk_read_guest_s": 3.0, "disk_read_host_s": 0.04,
                       "disk_read_0_guest_s": 1.0,
                       "costs": {"disk_read_0": {"cpl0_insns": 4000, "shim syscall entries": 40},
                                 "disk_read": {"cpl0_insns": 12000, "shim syscall entries": 60,
                                               "shim hypercall iret": 20, "BlockBackend[0] read": 4,
                                               "BlockBackend[0] worker_runs": 6,
                                               "BlockBackend[0] worker_wall_us": 8000,
                                               "BlockBackend[0] worker_cpu_us": 2000}}})
    lines = t.splitlines()
    assert lines[1].split()[-1] == "0.013" and "iret 5" in t
    steady = lines[lines.index(next(x for x in lines if x.startswith("steady"))) + 1]
    assert steady.split()[2:] == ["2.0", "2000", "5"]          # 4 MiB in 2 s; (12000-4000)/4; (60-40)/4
    assert lines[-1].split()[2:] == ["1.0", "1.5", "2.00", "0.50"]


def test_cpl0_costs_prints_every_price():
    """bench/cpl0_costs.py: every instruction class and both entry rows,
    each a number (a tiny COUNT: the prices, not their accuracy)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cpl0_costs.py"), "10"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if " us per " in line]
    assert len(rows) == 12, proc.stdout
    for line in rows:
        float(line.split(" us per ")[0].split()[-1])


def test_console_bench_per_write_arithmetic_and_host_baseline():
    """bench/console.py: counter differences, the per-write table, and the
    host side of the side-by-side run (the guest side boots a kernel)."""
    spec = importlib.util.spec_from_file_location("bench_console", REPO / "bench" / "console.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = {"events": {"backend_sends": 10, "blocks": 1, "check_irqs": 0, "timer_irqs": 5},
              "shim": {"trap 13": 100, "interrupts": 20}, "exits": {}}
    after = {"events": {"backend_sends": 20, "blocks": 1, "check_irqs": 4, "timer_irqs": 9},
             "shim": {"trap 13": 300, "interrupts": 30, "hypercall stack_switch": 20}, "exits": {}}
    d = mod.difference(after, before)
    assert d["events"] == {"backend_sends": 10, "check_irqs": 4, "timer_irqs": 4}
    pw = mod.per_write(d)
    assert pw["shim entries"] == (200 + 10) / 10 and pw["context switches"] == 2
    host = mod.host_run(4096, list(mod.WORKLOADS)[:1])
    assert all(r["seconds"] > 0 for r in host.values())


@pytest.mark.faithful
def test_shim_costs_prices_every_operation():
    """bench/shim_costs.py: the shimcost guest passes its own checks and every
    operation gets a row; none leaves the shim for Python (the IPI send is
    the shim's since SMP: events.c send); on kvm_pvm
    (CPL0 interpreted) each costs a positive number of CPL0 instructions,
    the same in two boots (exact counts).  Times are not asserted."""
    from pyvmm.vmm.quirks import on_kvm_pvm
    spec = importlib.util.spec_from_file_location("bench_shim_costs", REPO / "bench" / "shim_costs.py")
    costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(costs)
    first, second = costs.run_once(), costs.run_once()
    assert {"xen_version", "mmu_update", "iret", "int3_bounce_iret", "timer_upcall"} <= set(first)
    assert {k: r["python"] for k, r in first.items() if r["python"]} == {}
    if on_kvm_pvm():
        assert all(r["insns"] > 0 for r in first.values())
        exact = ("stack_switch", "mmu_update", "iret", "int3_bounce_iret")
        assert [first[k]["insns"] for k in exact] == [second[k]["insns"] for k in exact]


def _load_tools():
    spec = importlib.util.spec_from_file_location("bench_tools", REPO / "bench" / "tools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fio_report(rw: str, bw: int, iops: float, p50_ns: int, p99_ns: int) -> dict:
    side = {"io_bytes": bw * 2, "bw_bytes": bw, "iops": iops,
            "clat_ns": {"percentile": {"1.000000": 1, "50.000000": p50_ns, "99.000000": p99_ns}}}
    idle = {"io_bytes": 0, "bw_bytes": 0, "iops": 0.0, "clat_ns": {}}
    return {"fio version": "fio-3.33",
            "jobs": [{"jobname": "job", "read": side if rw == "read" else idle,
                      "write": side if rw == "write" else idle}]}


def _iperf_report(bps: float) -> dict:
    return {"start": {}, "intervals": [],
            "end": {"sum_sent": {"bits_per_second": bps * 1.01, "retransmits": 3},
                    "sum_received": {"bits_per_second": bps}}}


def test_tools_figures_and_table_from_tool_reports():
    """bench/tools.py: fio's and iperf3's JSON (as they print it, after
    console noise) to figures, and the table's rows and ratios."""
    tools = _load_tools()
    noisy = "[   12.5] xen_netfront: something {not json\n" + json.dumps(_fio_report("read", 4_000_000, 3.8, 2_000_000, 9_000_000))
    rd = tools.fio_figures(tools.json_of(noisy[noisy.index("\n") + 1:], "x"))
    assert rd["MB/s"] == 4.0 and rd["IOPS"] == 3.8 and rd["p50 us"] == 2000 and rd["p99 us"] == 9000
    wr = tools.fio_figures(_fio_report("write", 2_000_000_000, 1900, 300_000, 900_000))
    assert wr["MB/s"] == 2000
    with pytest.raises(tools.ToolError):
        tools.json_of("fio: engine libaio not loadable\n", "fio")
    with pytest.raises(tools.ToolError):
        tools.iperf_figures({"error": "unable to connect to server"})
    r = {"config": {"size_mb": 16, "runtime_s": 1, "seq_iodepth": 8},
         "guest": {"fio_engine": "libaio", "fio": {"seqread": rd},
                   "iperf3": {"tx1": tools.iperf_figures(_iperf_report(1e8))}},
         "host": {"fio_engine": "libaio", "fio": {"seqread": wr, "seqwrite": wr},
                  "iperf3": {"tx1": tools.iperf_figures(_iperf_report(2e10))}}}
    lines = tools.table(r).splitlines()
    assert "engine guest libaio, host libaio" in lines[0]
    assert lines[1].split()[-3:] == ["guest", "host", "guest/host"]
    body = {(" ".join(l.split()[:-4]), l.split()[-4]): l.split()[-3:] for l in lines[2:]}
    assert body[("fio seq read 1 MiB QD8", "MB/s")] == ["4", "2000", "0.002"]
    assert body[("fio seq write 1 MiB QD8", "MB/s")] == ["-", "2000", "-"]    # one side only
    assert body[("iperf3 guest->host 1 stream", "Gbit/s")] == ["0.1", "20", "0.005"]
    assert len(lines) == 2 + 4 + 4 + 1                 # no rows for runs neither side made
    r["qemu"] = {"fio_engine": "io_uring", "fio": {"seqread": wr}}
    lines = tools.table(r).splitlines()
    assert lines[1].split()[-2:] == ["qemu", "guest/qemu"] and "qemu io_uring" in lines[0]
    assert lines[2].split()[-5:] == ["4", "2000", "0.002", "2000", "0.002"]


def test_tools_a_peer_that_stops_keeps_what_it_measured():
    """bench/tools.py: a fio job that fails after others ended leaves
    theirs in the caller's dict, and a QEMU peer that stopped early is
    one line under the table, its missing figures '-'."""
    tools = _load_tools()
    report = json.dumps(_fio_report("read", 4_000_000, 3.8, 2_000_000, 9_000_000))
    calls = []

    def run(argv):
        calls.append(argv)
        return (0, report, "") if len(calls) == 1 else (1, "", "fio: the guest stopped answering")
    done: dict = {}
    with pytest.raises(tools.ToolError, match="stopped answering"):
        tools.run_fio(run, "/dev/vda", 1, 8, "libaio", out=done)
    first_job = tools.FIO_JOBS[0][0]
    assert list(done) == [first_job] and done[first_job]["MB/s"] == 4.0
    r = {"config": {"size_mb": 16, "runtime_s": 1, "seq_iodepth": 8},
         "guest": {"fio": {first_job: done[first_job], "seqwrite": done[first_job]}},
         "host": {"fio": {first_job: done[first_job], "seqwrite": done[first_job]}},
         "qemu": {"fio": dict(done), "error": "'fio rand read': nothing after 900 s"}}
    lines = tools.table(r).splitlines()
    assert lines[-1].startswith("qemu: stopped early ('fio rand read': nothing after 900 s)")
    write_mbs = next(l for l in lines if "seq write" in l and "MB/s" in l)
    assert write_mbs.split()[-2:] == ["-", "-"]


def test_tools_each_fio_job_runs_at_its_own_queue_depth():
    """bench/tools.py: the sequential jobs at --seq-iodepth, the random
    reads at --rand-iodepth (a lower one keeps the faithful lane's L1
    alive), and the table's labels say which."""
    tools = _load_tools()
    report = json.dumps(_fio_report("read", 4_000_000, 3.8, 2_000_000, 9_000_000))
    depths = {}

    def run(argv):
        job = next(a for a in argv if a.startswith("--rw="))
        depths[job] = [a for a in argv if a.startswith("--iodepth=")]
        return 0, report, ""
    _, figures = tools.run_fio(run, "/dev/vda", 1, 8, "libaio", rand_iodepth=4)
    assert depths == {"--rw=read": ["--iodepth=8"], "--rw=write": ["--iodepth=8"],
                      "--rw=randread": ["--iodepth=4"]}
    r = {"config": {"size_mb": 16, "runtime_s": 1, "seq_iodepth": 8, "rand_iodepth": 4},
         "guest": {"fio": figures}, "host": {"fio": figures}}
    labels = {l[:30].strip() for l in tools.table(r).splitlines()[2:]}     # the test column
    assert labels == {"fio seq read 1 MiB QD8", "fio seq write 1 MiB QD8", "fio rand read 4 KiB QD4"}


def test_tools_qemu_console_drives_a_stand_in(tmp_path):
    """bench/tools.py's QemuConsole gives bench/devices.py's Console QEMU's
    serial stdio: here a stand-in shell that prints a prompt and runs what
    it is sent, so guest_capture's markers and exit status round-trip."""
    tools = _load_tools()
    from devices import PROMPT, Console
    proc = subprocess.Popen(["sh", "-c", "printf 'pyvmm:/# '; while read -r l; do sh -c \"$l\"; "
                             "printf 'pyvmm:/# '; done"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        con = Console(tools.QemuConsole(proc))
        con.expect(PROMPT, 30, "first prompt")
        rc, out, err = tools.guest_capture(con, "echo '{\"a\": 1}'; echo oops >&2; false", tmp=str(tmp_path))
        assert rc == 1 and json.loads(out) == {"a": 1} and err.strip() == "oops"
    finally:
        proc.stdin.close()
        proc.wait(30)
    with pytest.raises(tools.ToolError, match="QEMU exited with status 0"):
        con.expect(PROMPT, 30, "a prompt that never comes")


@pytest.mark.heavy
@pytest.mark.slow
def test_tools_bench_runs_fio_and_iperf3_in_the_guest():
    """The whole bench/tools.py at its smallest: the tools fetched and
    layered, the guest boots, every fio job and (as root with a TAP)
    iperf3 run gives figures on both sides, every ratio positive.  3.5 to 5
    minutes on kvm_pvm, hence heavy."""
    p = subprocess.run([sys.executable, str(REPO / "bench" / "tools.py"), "--size-mb", "16",
                        "--runtime", "1", "--json"], capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tools: " in p.stderr and "booting" in p.stderr          # progress on stderr
    tools = _load_tools()
    r = json.loads(p.stdout)
    rows = tools.rows(r)
    assert len(rows) >= 12
    for test, metric, guest, host, _qemu in rows:
        q = tools.ratio(guest, host)
        assert q is not None and q > 0, (test, metric, guest, host)
    assert tools.table(r).count("\n") == len(rows) + 1
