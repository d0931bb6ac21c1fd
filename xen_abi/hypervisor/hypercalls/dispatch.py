"""The Python slow path of the Xen PV hypercall ABI.

The shim (in the guest) does the hot hypercalls itself and exits to Python
for the rest (table.py says which); the VMM then calls

    HypercallDispatcher(domain).dispatch(ctx, nr, args) -> value for guest rax

with a HypercallContext for the calling vCPU. Every pointer argument is a
guest-virtual address read and written through ctx.vm (GuestVirtualMemory),
every count and index is bounded, and any failure caused by guest input
becomes a negative Xen errno. The only exception that leaves dispatch() is
DomainShutdown (SCHEDOP_shutdown and friends).

What the handlers need from the domain is spelled out by
context.PvDomainBase.
"""
from __future__ import annotations

import logging
import threading
import types
from typing import Optional

from construct import ConstructError

from pyvmm.xen_abi.abi import (
    RUNSTATE_running,
    VCPU_INFO_SIZE,
    XEN_LEGACY_MAX_VCPUS,
    Hypercall,
    HypercallError,
    XenErrno,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U64, DomainShutdown, PvVcpuState, ShimRequest, fail
from pyvmm.xen_abi.hypervisor.hypercalls.table import python_handlers
from pyvmm.xen_abi.memory.guest_va import GuestPageFault
from pyvmm.xen_abi.memory.physmem import GuestPhysicalFault

log = logging.getLogger(__name__)


class HypercallDispatcher:
    """One domain's hypercall state and the entry point to the handlers."""

    def __init__(self, domain):
        self.domain = domain
        self.vcpus = [PvVcpuState(v) for v in range(domain.nr_vcpus)]
        for v, st in enumerate(self.vcpus):
            st.vcpu_info_gpa = (domain.shared_info_gpa + v * VCPU_INFO_SIZE
                                if v < XEN_LEGACY_MAX_VCPUS else None)
        self.vcpus[0].online = self.vcpus[0].initialised = True
        self.vcpus[0].runstate_state = RUNSTATE_running
        self.vm_assist = 0  # bitmask of VmAssistType
        self.shutdown_code: Optional[int] = None
        self.lock = threading.Lock()
        self.handlers = python_handlers()  # Hypercall -> handler(dispatcher, ctx, *args)
        self._logged: set = set()

    def dispatch(self, ctx, nr: int, args=()):
        """Run hypercall nr; the value for the guest's rax (negative = -errno),
        or a ShimRequest: the handler waits for the shim's answer (resume)."""
        a = tuple(int(x) & U64 for x in args[:6]) + (0,) * (6 - min(len(args), 6))
        handler = self.handlers.get(nr)
        if handler is None:
            return self.unsupported(nr, None)
        if not ctx.in_kernel_mode:
            return -XenErrno.EPERM  # hypercalls are for the guest kernel only
        return self._guarded(ctx, nr, a, lambda: handler(self, ctx, *a))

    def resume(self, ctx, value: int):
        """The shim's answer to the ShimRequest the vCPU's hypercall is
        waiting on: the handler goes on; as dispatch() returns."""
        st = self.vcpu_state(ctx.vcpu_id)
        if st.pending is None:
            raise RuntimeError(f"vCPU {ctx.vcpu_id}: a shim answer with no request outstanding")
        nr, a, gen = st.pending
        st.pending = None
        return self._guarded(ctx, nr, a, lambda: gen.send(value), gen)

    def _guarded(self, ctx, nr: int, a, step, gen=None):
        """Run one step of a handler; a generator handler that yields a
        ShimRequest is kept (per vCPU) until resume()."""
        try:
            rc = step()
            if isinstance(rc, types.GeneratorType):
                gen, rc = rc, rc.send(None)
            if isinstance(rc, ShimRequest):
                self.vcpu_state(ctx.vcpu_id).pending = (nr, a, gen)
                return rc
            return int(rc)
        except StopIteration as done:
            return int(done.value)
        except DomainShutdown:
            raise
        except HypercallError as e:
            return -e.errno
        except (GuestPageFault, GuestPhysicalFault, ConstructError) as e:
            log.debug("hypercall %d: guest fault: %s", nr, e)
            return -XenErrno.EFAULT
        except Exception:  # a VMM bug: report it, keep the guest (and host) alive
            log.exception("hypercall %d%r failed inside the VMM", nr, a)
            return -XenErrno.EINVAL

    def unsupported(self, nr: int, sub) -> int:
        """-ENOSYS, logged once per hypercall and sub-op."""
        key = (nr, sub)
        if key not in self._logged:
            self._logged.add(key)
            try:
                name = Hypercall(nr).name
            except ValueError:
                name = f"#{nr}"
            # Normal for a stock kernel (FIFO events, PMU, ...): info, not warning.
            log.info("unsupported hypercall %s%s -> -ENOSYS", name,
                     "" if sub is None else f" sub-op {sub}")
        return -XenErrno.ENOSYS

    def vcpu_state(self, vcpu_id: int) -> PvVcpuState:
        if not 0 <= vcpu_id < len(self.vcpus):
            fail(XenErrno.ENOENT, f"no vCPU {vcpu_id}")
        return self.vcpus[vcpu_id]
