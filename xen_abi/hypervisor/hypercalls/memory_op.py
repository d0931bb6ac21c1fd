"""memory_op: the memory map, the M2P's place, and the reservation (the
balloon's decrease/increase/populate: reservation.py owns the frames)."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    MACH2PHYS_VIRT_END,
    MACH2PHYS_VIRT_START,
    MEMOP_CMD_MASK,
    XENMEM_maximum_gpfn,
    E820Entry,
    Hypercall,
    MemoryOp,
    XenAddToPhysmap,
    XenErrno,
    XenMachphysMapping,
    XenMemoryMap,
    XenMemoryReservation,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import fail, is_self, other_domain_errno


def _read_own_domid(dispatcher, ctx, arg) -> int:
    domid = int.from_bytes(ctx.vm.read(arg, 2), "little")
    if not is_self(dispatcher.domain, domid):
        fail(other_domain_errno(domid), f"domain {domid}")
    return domid


_EXTENT_OPS = {MemoryOp.decrease_reservation: "decrease", MemoryOp.increase_reservation: "increase",
               MemoryOp.populate_physmap: "populate"}
_RESERVATION_DOMID = XenMemoryReservation.sizeof() - 8    # domid, then 6 bytes of padding


def memory_op(dispatcher, ctx, cmd, arg, *_):
    op = cmd & MEMOP_CMD_MASK
    d = dispatcher.domain
    if op == MemoryOp.memory_map:
        m = ctx.vm.read_struct(XenMemoryMap, arg)
        if not d.e820:
            return -XenErrno.ENOSYS  # what Xen says when no map was set
        n = min(m.nr_entries, len(d.e820))
        buf = b"".join(E820Entry.build({"addr": a, "size": s, "type": t}) for a, s, t in d.e820[:n])
        ctx.vm.write(m.buffer, buf)
        ctx.vm.write_struct(XenMemoryMap, arg, {"nr_entries": n, "buffer": m.buffer})
        return 0
    if op == MemoryOp.machphys_mapping:
        # Xen reports max_mfn = MACH2PHYS_NR_ENTRIES - 1 for a domU; here the M2P
        # only covers guest RAM (identity), so report its real size: Linux then
        # treats higher frames (shared_info, grant frames) as identity without
        # touching unmapped M2P entries.
        ctx.vm.write_struct(XenMachphysMapping, arg, {
            "v_start": d.m2p_va, "v_end": d.m2p_va + (MACH2PHYS_VIRT_END - MACH2PHYS_VIRT_START),
            "max_mfn": d.max_ram_mfn})
        return 0
    if op == MemoryOp.maximum_ram_page:
        return d.max_ram_mfn + 1
    if op == MemoryOp.current_reservation:
        _read_own_domid(dispatcher, ctx, arg)
        return d.nr_pages
    if op == MemoryOp.maximum_reservation:
        _read_own_domid(dispatcher, ctx, arg)
        return d.max_pages
    if op in _EXTENT_OPS and d.reservation is not None:
        _read_own_domid(dispatcher, ctx, arg + _RESERVATION_DOMID)
        return d.reservation.exchange_extents(ctx, _EXTENT_OPS[op], arg)
    if op == XENMEM_maximum_gpfn:
        _read_own_domid(dispatcher, ctx, arg)
        return d.max_ram_mfn
    if op == MemoryOp.add_to_physmap:
        ctx.vm.read_struct(XenAddToPhysmap, arg)
        return -XenErrno.EACCES  # only translated (HVM/PVH) guests may use it
    if op == MemoryOp.machine_memory_map:
        return -XenErrno.EPERM  # dom0 only
    return dispatcher.unsupported(Hypercall.memory_op, op)
