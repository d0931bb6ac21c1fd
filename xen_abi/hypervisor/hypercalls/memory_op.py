"""memory_op: the memory map, the M2P's place, and the reservation (the
balloon's decrease/increase/populate: reservation.py owns the frames), with
Xen 4.17's answers for a PV domU (common/memory.c do_memory_op,
arch/x86/mm.c arch_memory_op, x86_64/mm.c subarch_memory_op)."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    MEMOP_EXTENT_SHIFT,
    PAGE_SHIFT,
    SHARED_INFO_MAX_PFN,
    XEN_POD_TARGET_SIZE,
    XENMEM_get_pod_target,
    XENMEM_set_pod_target,
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
from pyvmm.xen_abi.hypervisor.hypercalls.context import U64, fail, is_self, other_domain_errno
from pyvmm.xen_abi.memory.guest_va import GuestPageFault, GuestVirtualMemory


def _read_own_domid(dispatcher, ctx, arg) -> int:
    domid = int.from_bytes(ctx.vm.read(arg, 2), "little")
    if not is_self(dispatcher.domain, domid):
        fail(other_domain_errno(domid), f"domain {domid}")
    return domid


_EXTENT_OPS = {MemoryOp.decrease_reservation: "decrease", MemoryOp.increase_reservation: "increase",
               MemoryOp.populate_physmap: "populate"}
_RESERVATION_DOMID = XenMemoryReservation.sizeof() - 8    # domid, then 6 bytes of padding


_NO_CONTINUATION = (MemoryOp.maximum_ram_page, MemoryOp.current_reservation,
                    MemoryOp.maximum_reservation, XENMEM_maximum_gpfn)
_M2P_CHUNK = 1 << 21


def _machphys_mfn_list(d, ctx, arg) -> int:
    """The frames of the M2P's 2 MiB chunks, as far as it covers the
    machine's frames (here: the guest's RAM), at most max_extents of them;
    a chunk that is not mapped repeats the previous frame, as in Xen."""
    max_extents = ctx.vm.read_u32(arg)          # struct: u32, pad, handle, u32, pad
    extent_start = ctx.vm.read_u64(arg + 8)
    ctx.vm.read(arg, 24)
    walk = GuestVirtualMemory(d.phys, ctx.vm.cr3, allow_hypervisor_range=True)
    end = d.m2p_va + (d.max_ram_mfn + 1) * 8
    i, last, va = 0, 0, d.m2p_va
    while i != max_extents and va < end:
        try:
            last = walk.translate(va) >> PAGE_SHIFT
        except GuestPageFault:
            pass
        ctx.vm.write_u64(extent_start + i * 8, last)
        i, va = i + 1, va + _M2P_CHUNK
    ctx.vm.write_u32(arg + 16, i)
    return 0


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
    if op in _NO_CONTINUATION and cmd >> MEMOP_EXTENT_SHIFT:
        fail(XenErrno.EINVAL, "a start extent for a sub-op without one")
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
        # a PV guest's: (shared_info.arch.max_pfn, which the guest writes, or 1) - 1
        _read_own_domid(dispatcher, ctx, arg)
        max_pfn = d.phys.read_u64(d.shared_info_gpa + SHARED_INFO_MAX_PFN)
        return ((max_pfn or 1) - 1) & U64
    if op == MemoryOp.add_to_physmap:
        ctx.vm.read_struct(XenAddToPhysmap, arg)
        return -XenErrno.EACCES  # only translated (HVM/PVH) guests may use it
    if op == MemoryOp.machine_memory_map:
        return -XenErrno.EPERM  # dom0 only
    if op in (XENMEM_get_pod_target, XENMEM_set_pod_target):
        # xen_pod_target_t: read whole; the domain looked up; not HVM: -EINVAL
        domid = int.from_bytes(ctx.vm.read(arg, XEN_POD_TARGET_SIZE)[32:34], "little")
        if not is_self(d, domid) and domid != 0:
            fail(XenErrno.ESRCH, f"domain {domid}")
        return -XenErrno.EINVAL
    if op == MemoryOp.machphys_mfn_list:
        return _machphys_mfn_list(d, ctx, arg)
    return dispatcher.unsupported(Hypercall.memory_op, op)
