"""Host side of the shim's time, timer and event paths (shim/events.c).

* pvclock: the vcpu_info.time record Xen keeps per vCPU (version odd while
  writing), computed from one TSC snapshot -- with a constant TSC one
  suffices -- and Xen's set_time_scale();
* the shared_info wallclock (wall time at system time 0);
* the per-vCPU events block the shim reads (EVENTS in shim/layout.py);
* the vCPU's LAPIC set up for the shim's timer (x2APIC, TSC-deadline mode
  when KVM offers it, else one-shot) and the "event check" MSI that kicks
  a vCPU after Python raised one of its ports.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pyvmm.vmm import x86
from pyvmm.vmm.kvm import Cap

from pyvmm.xen_abi import abi
from pyvmm.xen_abi.hypervisor.hypercalls.xen_version import XEN_VERSION
from pyvmm.xen_abi.shim.layout import EV_SPURIOUS_VECTOR, EV_TIMER_VECTOR, EVENTS, EventsFlag

# ---- KVM / LAPIC ----
APIC_REG_SVR = 0xF0
APIC_REG_LVTT = 0x320
APIC_REG_TDCR = 0x3E0
APIC_SVR_ENABLE = 1 << 8
APIC_LVT_MASKED = 1 << 16
APIC_LVTT_TSC_DEADLINE = 2 << 17
APIC_LVTT_ONESHOT = 0
APIC_LVTT_MODE_MASK = 3 << 17
APIC_TDCR_DIV_1 = 0xB
CPUID1_ECX_X2APIC = 1 << 21
CPUID1_ECX_TSC_DEADLINE = 1 << 24
MSI_DEST_ID_SHIFT = 12               # MSI address bits 19:12: destination APIC ID

NS_PER_SEC = 1_000_000_000
U64 = (1 << 64) - 1


def time_scale(tsc_hz: int) -> tuple[int, int]:
    """Xen's set_time_scale: (mul, shift) with ns = ((tsc << shift) * mul) >> 32
    (right shift for negative shift), mul a 32-bit fraction in [0.5, 1)."""
    if tsc_hz <= 0:
        raise ValueError("TSC frequency must be positive")
    shift, t = 0, tsc_hz
    while t <= NS_PER_SEC:        # the fraction must stay below 1
        t <<= 1
        shift += 1
    while t > 2 * NS_PER_SEC:     # ... and at least 1/2
        t >>= 1
        shift -= 1
    mul = (NS_PER_SEC << 32) // t
    assert 1 << 31 <= mul < 1 << 32
    return mul, shift


def pvclock_ns(tsc: int, clock: "PvClock") -> int:
    """System time the guest computes from a TSC reading (the pvclock formula)."""
    delta = (tsc - clock.tsc_timestamp) & U64
    delta = (delta << clock.tsc_shift) & U64 if clock.tsc_shift >= 0 else delta >> -clock.tsc_shift
    return clock.system_time + ((delta * clock.tsc_to_system_mul) >> 32)


def tsc_is_stable() -> bool:
    """constant + nonstop TSC on the host: one pvclock snapshot stays valid."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"constant_tsc", "nonstop_tsc"} <= flags
    return False


@dataclass
class PvClock:
    tsc_timestamp: int
    system_time: int
    tsc_to_system_mul: int
    tsc_shift: int
    flags: int
    tsc_khz: int

    @property
    def ns_to_tsc_mul(self) -> int:
        """tsc ticks = ns * this >> 32 (the shim's deadline conversion)."""
        return (self.tsc_khz << 32) // 1_000_000


def write_vcpu_time(phys, vcpu_info_gpa: int, clock: PvClock) -> None:
    """vcpu_info.time with Xen's version protocol: odd while the record is
    inconsistent, even (and bumped) once it is complete."""
    base = vcpu_info_gpa + abi.VCPU_INFO_TIME
    version = int.from_bytes(phys.read(base, 4), "little")
    odd = version + 1 if not version & 1 else version
    phys.write(base, struct.pack("<I", odd & 0xFFFFFFFF))
    rec = abi.VcpuTimeInfo.build({
        "version": odd & 0xFFFFFFFF, "pad0": 0, "tsc_timestamp": clock.tsc_timestamp & U64,
        "system_time": clock.system_time & U64, "tsc_to_system_mul": clock.tsc_to_system_mul,
        "tsc_shift": clock.tsc_shift, "flags": clock.flags, "pad1": bytes(2)})
    phys.write(base + 4, rec[4:])
    phys.write(base, struct.pack("<I", (odd + 1) & 0xFFFFFFFF))


def write_time_copy(phys, pieces, rec: bytes) -> None:
    """A vcpu_time_info record into the guest's area (pieces [(gpa, n)]),
    with Xen's version protocol: an odd version, the body, the record's
    own (even) version."""
    version = int.from_bytes(rec[:4], "little")
    odd = (version - 1 if version % 2 == 0 else version) & 0xFFFFFFFF

    def put(lo: int, data: bytes) -> None:     # record bytes [lo, lo + len(data))
        start = 0
        for gpa, n in pieces:
            a, b = max(lo, start), min(lo + len(data), start + n)
            if a < b:
                phys.write(gpa + a - start, data[a - lo:b - lo])
            start += n
    put(0, odd.to_bytes(4, "little"))
    put(4, rec[4:])
    put(0, rec[:4])


def write_wallclock(phys, shared_info_gpa: int, wall_ns_at_zero: int) -> None:
    """shared_info wc_* = wall-clock time at system time 0 (version odd/even)."""
    base = shared_info_gpa
    v = int.from_bytes(phys.read(base + abi.SHARED_INFO_WC_VERSION, 4), "little")
    odd = v + 1 if not v & 1 else v
    sec, nsec = divmod(wall_ns_at_zero, NS_PER_SEC)
    phys.write(base + abi.SHARED_INFO_WC_VERSION, struct.pack("<I", odd & 0xFFFFFFFF))
    phys.write(base + abi.SHARED_INFO_WC_SEC, struct.pack("<III", sec & 0xFFFFFFFF, nsec,
                                                          (sec >> 32) & 0xFFFFFFFF))
    phys.write(base + abi.SHARED_INFO_WC_VERSION, struct.pack("<I", (odd + 1) & 0xFFFFFFFF))


def get_tsc_khz(vcpu) -> int:
    return vcpu.get_tsc_khz()


def write_events_block(mem, off: int, clock: PvClock, *, xen_version: int, tsc_deadline: bool,
                       send_port: bool) -> None:
    """The shim's inputs in one vCPU's events block (mem: the region's GuestMemory)."""
    flags = (EventsFlag.TSC_DEADLINE if tsc_deadline else 0) | (EventsFlag.SEND_PORT if send_port else 0)
    EVENTS.write(mem, off, tsc_timestamp=clock.tsc_timestamp & U64, system_time=clock.system_time & U64,
                 tsc_mul=clock.tsc_to_system_mul, tsc_shift=clock.tsc_shift & U64,
                 ns_to_tsc_mul=clock.ns_to_tsc_mul & U64, xen_version=xen_version, flags=flags)


def read_counters(mem, off: int) -> dict[str, int]:
    return {name: EVENTS.read(mem, off, name)
            for name in ("timer_irqs", "check_irqs", "blocks", "backend_sends")}


def set_backend_port(mem, off: int, port: int, on: bool) -> None:
    if not 0 <= port < abi.EVTCHN_2L_NR_CHANNELS:
        raise ValueError(f"port {port} out of range")
    byte = off + EVENTS.offset("backend_map", port // 8)
    b = mem.read(byte, 1)[0]
    b = b | (1 << port % 8) if on else b & ~(1 << port % 8)
    mem.write(byte, bytes([b]))


MSR_KVM_STEAL_TIME = 0x4B564D03
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_STEAL_TIME = 5
KVM_MSR_ENABLED = 1


def enable_steal_time(kvm, vcpu, gpa: int) -> int | None:
    """KVM's steal time for a vCPU at guest-physical gpa (64-byte aligned),
    from the vCPU's own thread: KVM adds the time that thread waited for a
    host CPU each time it runs it again -- the runstate's "runnable" time.
    It starts from the thread's whole wait so far, which is returned (the
    base to subtract); None where KVM has no steal time."""
    if not any(e.function == KVM_CPUID_FEATURES and e.eax >> KVM_FEATURE_STEAL_TIME & 1
               for e in kvm.supported_cpuid()):
        return None
    try:
        base = int(Path("/proc/thread-self/schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None          # no run-queue figures: no base, so no steal time either
    vcpu.set_msrs({MSR_KVM_STEAL_TIME: gpa | KVM_MSR_ENABLED})
    return base


def runstate_times(mem, events_off: int, now: int) -> list[int]:
    """Xen's runstate time[] of a vCPU from its events block: runnable
    (KVM's steal time), blocked (halted in the shim), offline (Python),
    running the rest of system time.  The shim's ev_runstate_update sums
    the same way."""
    steal, base = EVENTS.read(mem, events_off, "kvm_steal", 0), EVENTS.read(mem, events_off, "steal_base")
    runnable = max(0, steal - base)
    blocked = EVENTS.read(mem, events_off, "blocked_ns")
    offline = EVENTS.read(mem, events_off, "offline_ns")
    return [max(0, now - runnable - blocked - offline), runnable, blocked, offline]


def want_tsc_deadline(kvm) -> bool:
    return bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER))


def _advertise(vcpu, bits: int) -> None:
    """Set CPUID.1:ECX bits in the vCPU's KVM table (before its first run).
    KVM only honours x2APIC / TSC-deadline mode when the table shows them,
    and KVM_GET_SUPPORTED_CPUID leaves TSC-deadline out on some hosts
    (userspace is expected to add it when KVM_CAP_TSC_DEADLINE_TIMER)."""
    entries = vcpu.get_cpuid()
    for e in entries:
        if e.function == 1:
            if e.ecx & bits == bits:
                return
            e.ecx |= bits
    vcpu.set_cpuid(entries)


def setup_lapic(vcpu, apic_id: int, *, tsc_deadline: bool) -> bool:
    """x2APIC on, software-enabled, LVT timer unmasked on EV_TIMER_VECTOR in
    TSC-deadline (or one-shot, divide-by-1) mode.  Returns whether
    TSC-deadline mode took (read back from KVM); if not, one-shot."""
    _advertise(vcpu, CPUID1_ECX_X2APIC | (CPUID1_ECX_TSC_DEADLINE if tsc_deadline else 0))
    base = x86.APIC_DEFAULT_BASE | x86.APIC_BASE_ENABLE | x86.APIC_BASE_X2APIC
    if apic_id == 0:
        base |= x86.APIC_BASE_BSP
    vcpu.set_msrs({x86.MSR_APIC_BASE: base})
    st = vcpu.get_lapic()
    st.set_reg(APIC_REG_SVR, APIC_SVR_ENABLE | EV_SPURIOUS_VECTOR)
    st.set_reg(APIC_REG_TDCR, APIC_TDCR_DIV_1)
    st.set_reg(APIC_REG_LVTT, EV_TIMER_VECTOR | (APIC_LVTT_TSC_DEADLINE if tsc_deadline else APIC_LVTT_ONESHOT))
    vcpu.set_lapic(st)
    if tsc_deadline and vcpu.get_lapic().reg(APIC_REG_LVTT) & APIC_LVTT_MODE_MASK != APIC_LVTT_TSC_DEADLINE:
        st.set_reg(APIC_REG_LVTT, EV_TIMER_VECTOR | APIC_LVTT_ONESHOT)    # KVM refused the mode
        vcpu.set_lapic(st)
        return False
    return tsc_deadline


def msi_address(apic_id: int) -> int:
    return x86.MSI_ADDRESS_BASE | (apic_id << MSI_DEST_ID_SHIFT)


# ---- one domain's time base ----
CALIBRATION_S = 0.05     # TSC rate measurement when the TSC is not invariant


class DomainClock:
    """A domain's time: the LAPIC of each vCPU set up for the shim's timer,
    one pvclock snapshot -- the guest TSC read at `boot_ns` (CLOCK_MONOTONIC)
    is system time 0 -- written to every vcpu_info and events block, and the
    wallclock.  now_ns() is the same system time seen from Python.

        clock = DomainClock(kvm, vcpus, region, phys)   # after the vCPUs exist, before they run

    The TSC is read through vCPU 0 (all vCPUs of a VM share it), from a
    thread where it is not in KVM_RUN.
    """

    def __init__(self, kvm, vcpus, region, phys):
        vcpus = list(vcpus) if isinstance(vcpus, (list, tuple)) else [vcpus]
        self.vcpu = vcpus[0]
        self.region = region
        self.phys = phys
        self.tsc_deadline = want_tsc_deadline(kvm)
        for v in region.vcpus:
            self.tsc_deadline = setup_lapic(vcpus[v.index], v.index, tsc_deadline=self.tsc_deadline)
        self.pvclock, self.boot_ns = self._snapshot()
        self._vcpu_info_gpa = [region.shared_info_gpa + v.index * abi.VCPU_INFO_SIZE for v in region.vcpus]
        self._time_area: dict[int, list] = {}   # VCPUOP_register_vcpu_time_memory_area
        self._paused_at: int | None = None      # guest system time when pause() stopped it
        self._publish()

    def _publish(self) -> None:
        """Write the wallclock and the current pvclock record everywhere the
        guest and the shim read them."""
        write_wallclock(self.phys, self.region.shared_info_gpa, time.time_ns() - self.now_ns())
        for v in self.region.vcpus:
            write_vcpu_time(self.phys, self._vcpu_info_gpa[v.index], self.pvclock)
            self._copy_to_time_area(v.index)
            # guest sends to back-end ports go out through EV_SEND_PORT (notify.py)
            write_events_block(self.region.mem, v.events_off, self.pvclock,
                               xen_version=(XEN_VERSION[0] << 16) | XEN_VERSION[1],
                               tsc_deadline=self.tsc_deadline, send_port=True)

    def now_ns(self) -> int:
        """Guest system time (ns)."""
        if self._paused_at is not None:
            return self._paused_at
        return time.monotonic_ns() - self.boot_ns

    # ---- pause: the guest's clock stops with it ----
    # As QEMU stops kvmclock while a VM is stopped: after `pyvmm unpause`
    # the guest's monotonic time continues where it stopped, so its timers
    # do not all expire at once and it sees no jump.  Its wall time lags by
    # the pause (as under QEMU) until something like NTP corrects it.
    # Called from the vCPU thread while the vCPU is out of KVM_RUN.

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = pvclock_ns(self._read_tsc()[0], self.pvclock)

    def resume(self) -> None:
        """A new pvclock record: the TSC now is the system time the guest
        last saw (its own formula at the pause), so time resumes without a
        step backwards or forwards."""
        stopped_at, self._paused_at = self._paused_at, None
        if stopped_at is None:
            return
        tsc, mid = self._read_tsc()
        p = self.pvclock
        self.pvclock = PvClock(tsc, stopped_at, p.tsc_to_system_mul, p.tsc_shift, p.flags, p.tsc_khz)
        self.boot_ns = mid - stopped_at
        self._publish()

    def _snapshot(self) -> tuple[PvClock, int]:
        """The pvclock record and the monotonic time its TSC was read at."""
        khz = get_tsc_khz(self.vcpu)
        stable = tsc_is_stable()
        tsc, mid = self._read_tsc()
        if not stable:
            # no invariant TSC (e.g. the faithful lane's TCG): KVM's tsc_khz
            # can be far off; measure the rate against CLOCK_MONOTONIC, as
            # Xen calibrates against its platform timer
            time.sleep(CALIBRATION_S)
            tsc2, mid2 = self._read_tsc()
            measured = (tsc2 - tsc) * 1_000_000 // max(1, mid2 - mid)
            # nested KVM may not advance a never-run vCPU's TSC: keep KVM's
            # figure unless the measurement is plausible
            if khz // 2 < measured < khz * 2:
                khz = measured
        mul, shift = time_scale(khz * 1000)
        flags = abi.XEN_PVCLOCK_TSC_STABLE_BIT if stable else 0
        return PvClock(tsc, 0, mul, shift, flags, khz), mid

    def _read_tsc(self) -> tuple[int, int]:
        """Guest TSC and the monotonic time it was read at (bracketed)."""
        m0 = time.monotonic_ns()
        tsc = self.vcpu.get_msrs([x86.MSR_TSC])[x86.MSR_TSC]
        m1 = time.monotonic_ns()
        return tsc, (m0 + m1) // 2

    def vcpu_info_moved(self, vcpu_id: int, gpa: int) -> None:
        """The guest registered vcpu_info at gpa: the time record goes there."""
        self._vcpu_info_gpa[vcpu_id] = gpa
        write_vcpu_time(self.phys, gpa, self.pvclock)
        self._copy_to_time_area(vcpu_id)

    def time_area_moved(self, vcpu_id: int, pieces) -> None:
        """The guest's own copy of the time record (Xen's time_info_guest):
        written now and with vcpu_info's from now on; [] stops that."""
        if pieces:
            self._time_area[vcpu_id] = list(pieces)
            self._copy_to_time_area(vcpu_id)
        else:
            self._time_area.pop(vcpu_id, None)

    def _copy_to_time_area(self, vcpu_id: int) -> None:
        pieces = self._time_area.get(vcpu_id)
        if pieces:
            rec = bytes(self.phys.read(self._vcpu_info_gpa[vcpu_id] + abi.VCPU_INFO_TIME,
                                       abi.VcpuTimeInfo.sizeof()))
            write_time_copy(self.phys, pieces, rec)

    def after_hypercall(self, nr: int, evtchn) -> None:
        """Keep the shim's copy of each vCPU's VIRQ_TIMER port current."""
        if nr != abi.Hypercall.event_channel_op:
            return
        for v in self.region.vcpus:
            port = evtchn.virq_to_port[v.index].get(int(abi.Virq.TIMER), 0)
            EVENTS.write(self.region.mem, v.events_off, timer_port=port)

    def counters(self, vcpu_id: int = 0) -> dict[str, int]:
        """What the shim counted in the vCPU's events block (timer and
        event-check interrupts, blocks, back-end sends)."""
        return read_counters(self.region.mem, self.region.vcpus[vcpu_id].events_off)
