"""Who handles each hypercall, declared once.

Every hypercall first reaches the shim in the guest (xen_abi/shim/shim.c
hypercall(), which also asks events.c ev_hypercall()); what the shim does
not finish exits to Python, to HypercallDispatcher.  So each hypercall is
owned by

  shim         finished in the guest; Python never sees it
  python       the shim passes it straight on
  split        some sub-ops in the shim, the rest in Python (`note` says which)
  unsupported  nobody: the dispatcher answers -ENOSYS (`note` says why)

The dispatcher's handler map is built from OWNERS; tests/xen_abi/hypervisor/test_hypercall_table.py
checks OWNERS against the shim's C switches and against README.md's table,
which `python -m pyvmm.xen_abi.hypervisor.hypercalls.table` prints.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

from pyvmm.xen_abi.abi import Hypercall
from pyvmm.xen_abi.hypervisor.hypercalls.console_io import console_io
from pyvmm.xen_abi.hypervisor.hypercalls.event_channel_op import event_channel_op
from pyvmm.xen_abi.hypervisor.hypercalls.grant_table_op import grant_table_op
from pyvmm.xen_abi.hypervisor.hypercalls.memory_op import memory_op
from pyvmm.xen_abi.hypervisor.hypercalls.physdev_op import physdev_op
from pyvmm.xen_abi.hypervisor.hypercalls.sched_op import sched_op
from pyvmm.xen_abi.hypervisor.hypercalls.vcpu_op import vcpu_op
from pyvmm.xen_abi.hypervisor.hypercalls.vm_assist import vm_assist
from pyvmm.xen_abi.hypervisor.hypercalls.xen_version import xen_version


class Owner(enum.Enum):
    SHIM = "shim"
    PYTHON = "python"
    SPLIT = "split"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class HypercallOwner:
    hypercall: Hypercall
    shim: tuple = ()                    # "file.c:function" in xen_abi/shim/ doing the shim's part
    python: Optional[Callable] = None   # handler(dispatcher, ctx, *args) in this package
    note: str = ""                      # split: which sub-ops where; unsupported: why

    @property
    def owner(self) -> Owner:
        if self.shim and self.python:
            return Owner.SPLIT
        if self.shim:
            return Owner.SHIM
        if self.python:
            return Owner.PYTHON
        return Owner.UNSUPPORTED


def _shim(hypercall, *where, note=""):
    return HypercallOwner(hypercall, shim=where, note=note)


def _python(hypercall, handler, note=""):
    return HypercallOwner(hypercall, python=handler, note=note)


def _split(hypercall, shim, handler, note):
    return HypercallOwner(hypercall, shim=shim, python=handler, note=note)


def _unsupported(hypercall, why):
    return HypercallOwner(hypercall, note=why)


H = Hypercall
OWNERS = (
    _shim(H.set_trap_table, "shim.c:do_set_trap_table"),
    _shim(H.mmu_update, "mmu.c:do_mmu_update"),
    _shim(H.set_gdt, "mmu.c:do_set_gdt"),
    _shim(H.stack_switch, "shim.c:hypercall"),
    _unsupported(H.set_callbacks, "the older interface; Linux registers its callbacks with callback_op"),
    _shim(H.fpu_taskswitch, "shim.c:hypercall"),
    _unsupported(H.sched_op_compat, "the pre-3.0.2 form of sched_op"),
    _unsupported(H.platform_op, "dom0 only"),
    _shim(H.set_debugreg, "priv.c:do_set_debugreg",
          note="loaded into the CPU; I/O breakpoints (CR4.DE) checked on each emulated in/out (priv.c)"),
    _shim(H.get_debugreg, "priv.c:do_get_debugreg"),
    _shim(H.update_descriptor, "mmu.c:do_update_descriptor"),
    _python(H.memory_op, memory_op),
    _shim(H.multicall, "shim.c:do_multicall",
          note="each entry as if called alone; nested -EINVAL as Xen; an iret entry -EINVAL (Xen performs it)"),
    _shim(H.update_va_mapping, "mmu.c:do_update_va_mapping"),
    _shim(H.set_timer_op, "events.c:set_timer_op"),
    _unsupported(H.event_channel_op_compat, "the pre-3.0.2 form of event_channel_op"),
    _split(H.xen_version, ("events.c:ev_hypercall",), xen_version,
           "shim: XENVER_version (Linux's force_evtchn_callback); Python: the other sub-ops"),
    _python(H.console_io, console_io),
    _unsupported(H.physdev_op_compat, "the pre-3.0.2 form of physdev_op"),
    _python(H.grant_table_op, grant_table_op,
            note="a host map's PTE is put in and taken out by the shim (mmu.c mmu_grant_pte), asked "
                 "mid-hypercall (MBOP_GRANT_PTE); dump_table -ENOSYS as Xen 4.17; transfer -ENOSYS"),
    _python(H.vm_assist, vm_assist),
    _unsupported(H.update_va_mapping_otherdomain, "another domain's page tables: there is none"),
    _shim(H.iret, "shim.c:do_iret", note="reached from shim_hypercall, not the hypercall switch"),
    _split(H.vcpu_op, ("shim.c:hypercall", "shim.c:vcpu_initialise", "events.c:ev_hypercall",
                       "shim.c:send_nmi"), vcpu_op,
           "shim: -ENOENT for absent vCPUs, the caller's set/stop_singleshot_timer and "
           "stop_periodic_timer, initialise's GDT and base pointers, send_nmi; Python: the rest"),
    _shim(H.set_segment_base, "shim.c:do_set_segment_base"),
    _shim(H.mmuext_op, "mmu.c:do_mmuext_op"),
    _unsupported(H.xsm_op, "no XSM policy"),
    _unsupported(H.nmi_op, "deprecated; NMI callbacks go through callback_op"),
    _split(H.sched_op, ("shim.c:hypercall", "events.c:block", "events.c:poll"), sched_op,
           "shim: yield, block, poll; Python: shutdown, shutdown_code, remote_shutdown"),
    _shim(H.callback_op, "shim.c:do_callback_op"),
    _unsupported(H.xenoprof_op, "no profiling"),
    _split(H.event_channel_op, ("events.c:send", "events.c:unmask"), event_channel_op,
           "shim: send to a back-end port (an ioeventfd) or an IPI port, unmask (either ABI); "
           "Python: the rest, FIFO's init_control / expand_array / set_priority included"),
    _split(H.physdev_op, ("shim.c:events_or_python", "priv.c:priv_physdev_op"), physdev_op,
           "set_iopl, set_iobitmap: Python validates, then the shim keeps them; other sub-ops -ENOSYS"),
    _unsupported(H.hvm_op, "HVM and PVH guests only"),
    _unsupported(H.sysctl, "toolstack (dom0) only"),
    _unsupported(H.domctl, "toolstack (dom0) only"),
    _unsupported(H.kexec_op, "dom0 only"),
    _unsupported(H.tmem_op, "removed from Xen"),
    _unsupported(H.argo_op, "no other domain to talk to"),
    _unsupported(H.xenpmu_op, "no virtual PMU; Linux does without"),
    _unsupported(H.dm_op, "device models (dom0) only"),
    _unsupported(H.hypfs_op, "no hypervisor file system"),
    _unsupported(H.mca, "dom0 only"),
)


def python_handlers() -> dict:
    """Hypercall -> handler, for the Python and split entries."""
    return {e.hypercall: e.python for e in OWNERS if e.python is not None}


def readme_rows() -> list:
    """The rows of README.md's "Hypercalls: who handles each" table."""
    rows = ["| # | hypercall | owner | shim (`xen_abi/shim/`) | Python (`hypercalls/`) | notes |",
            "| --- | --- | --- | --- | --- | --- |"]
    for e in OWNERS:
        shim = ", ".join(f"{f} `{fn}`" for f, fn in (w.split(":") for w in e.shim))
        python = f"{e.python.__module__.rsplit('.', 1)[1]}.py `{e.python.__name__}`" if e.python else ""
        rows.append(f"| {int(e.hypercall)} | {e.hypercall.name} | {e.owner.value} | {shim} | {python} | {e.note} |")
    return rows


if __name__ == "__main__":
    print("\n".join(readme_rows()))
