"""xen_version: every sub-op but XENVER_version, which the shim answers
(events.c ev_hypercall, from the number Python writes into the events block)."""
from __future__ import annotations

from pyvmm.xen_abi.abi import (
    HYPERVISOR_VIRT_START,
    PAGE_SIZE,
    PV_FEATURES_SUBMAP0,
    XEN_CAPABILITIES_INFO_LEN,
    XEN_CHANGESET_INFO_LEN,
    XEN_DOMAIN_HANDLE_LEN,
    XEN_EXTRAVERSION_LEN,
    XENFEAT_NR_SUBMAPS,
    Hypercall,
    VmAssistType,
    XenCompileInfo,
    XenErrno,
    XenFeat,
    XenFeatureInfo,
    XenPlatformParameters,
    XenVer,
)
from pyvmm.xen_abi.hypervisor.hypercalls.context import U32, fail

XEN_VERSION = (4, 17)
XEN_EXTRAVERSION = ".0-pyvmm"
XEN_CAPABILITIES = "xen-3.0-x86_64"
XEN_CHANGESET = "pyvmm"
XEN_COMPILER = "python"


def _cstr(s: str, n: int) -> bytes:
    """NUL-padded, always NUL-terminated char[n]."""
    b = s.encode()[: n - 1]
    return b + bytes(n - len(b))


def xen_version(dispatcher, ctx, cmd, arg, *_):
    cmd &= U32
    vm = ctx.vm
    if cmd == XenVer.extraversion:
        vm.write(arg, _cstr(XEN_EXTRAVERSION, XEN_EXTRAVERSION_LEN))
    elif cmd == XenVer.compile_info:
        vm.write_struct(XenCompileInfo, arg, {"compiler": XEN_COMPILER, "compile_by": "pyvmm",
                                              "compile_domain": "localdomain",
                                              "compile_date": "unknown"})
    elif cmd == XenVer.capabilities:
        vm.write(arg, _cstr(XEN_CAPABILITIES, XEN_CAPABILITIES_INFO_LEN))
    elif cmd == XenVer.changeset:
        vm.write(arg, _cstr(XEN_CHANGESET, XEN_CHANGESET_INFO_LEN))
    elif cmd == XenVer.platform_parameters:
        vm.write_struct(XenPlatformParameters, arg, {"virt_start": HYPERVISOR_VIRT_START})
    elif cmd == XenVer.get_features:
        fi = vm.read_struct(XenFeatureInfo, arg)
        if fi.submap_idx >= XENFEAT_NR_SUBMAPS:
            fail(XenErrno.EINVAL, "unknown feature submap")  # as Xen
        submap = PV_FEATURES_SUBMAP0
        if dispatcher.vm_assist >> VmAssistType.PAE_EXTENDED_CR3 & 1:
            submap |= 1 << XenFeat.pae_pgdir_above_4gb
        vm.write_struct(XenFeatureInfo, arg, {"submap_idx": fi.submap_idx, "submap": submap})
    elif cmd == XenVer.pagesize:
        return PAGE_SIZE
    elif cmd == XenVer.guest_handle:
        handle = bytes(dispatcher.domain.handle)[:XEN_DOMAIN_HANDLE_LEN]
        vm.write(arg, handle.ljust(XEN_DOMAIN_HANDLE_LEN, b"\0"))
    elif cmd in (XenVer.commandline, XenVer.build_id):
        return -XenErrno.EPERM  # privileged in Xen (XSM) for a domU
    else:
        return dispatcher.unsupported(Hypercall.xen_version, cmd)
    return 0
