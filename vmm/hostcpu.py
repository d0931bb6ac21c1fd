"""The host CPU's own CPUID and XCR0, read by this process.

Under kvm_pvm guest code at CPL3 runs natively on the host CPU: it sees the
host's CPUID leaves 1 and 7 and runs with the host's XCR0, whatever the VMM
configured (vmm/quirks.py).  The VMM needs those values to describe to the
guest what its code can really use.  Python cannot execute `cpuid` or
`xgetbv`, so two tiny machine-code routines run from an executable mapping
through ctypes (x86-64 System V calling convention).
"""
from __future__ import annotations

import ctypes
import mmap
import platform
from functools import lru_cache

# void cpuid(u32 leaf, u32 subleaf, u32 out[4])
_CPUID_CODE = bytes([
    0x53,                    # push %rbx            (callee-saved)
    0x49, 0x89, 0xd0,        # mov  %rdx, %r8       out
    0x89, 0xf8,              # mov  %edi, %eax      leaf
    0x89, 0xf1,              # mov  %esi, %ecx      subleaf
    0x0f, 0xa2,              # cpuid
    0x41, 0x89, 0x00,        # mov  %eax, (%r8)
    0x41, 0x89, 0x58, 0x04,  # mov  %ebx, 4(%r8)
    0x41, 0x89, 0x48, 0x08,  # mov  %ecx, 8(%r8)
    0x41, 0x89, 0x50, 0x0c,  # mov  %edx, 12(%r8)
    0x5b,                    # pop  %rbx
    0xc3,                    # ret
])
# u64 xgetbv(u32 index)
_XGETBV_CODE = bytes([
    0x89, 0xf9,              # mov  %edi, %ecx
    0x0f, 0x01, 0xd0,        # xgetbv
    0x48, 0xc1, 0xe2, 0x20,  # shl  $32, %rdx
    0x48, 0x09, 0xd0,        # or   %rdx, %rax
    0xc3,                    # ret
])
_XGETBV_OFF = 64            # second routine's offset in the page

CPUID1_ECX_OSXSAVE = 1 << 27


class HostCpuError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def _routines():
    if platform.machine() not in ("x86_64", "AMD64"):
        raise HostCpuError(f"host CPU is {platform.machine()}, not x86-64")
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as e:      # e.g. a W^X policy
        raise HostCpuError(f"no executable mapping for the cpuid routine: {e}") from e
    page.write(_CPUID_CODE)
    page.seek(_XGETBV_OFF)
    page.write(_XGETBV_CODE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    cpuid_fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                ctypes.POINTER(ctypes.c_uint32))(base)
    xgetbv_fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + _XGETBV_OFF)
    return page, cpuid_fn, xgetbv_fn     # the page must outlive the functions


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of the host CPU's `cpuid`."""
    _, fn, _ = _routines()
    out = (ctypes.c_uint32 * 4)()
    fn(leaf, subleaf, out)
    return tuple(out)


def xgetbv(index: int = 0) -> int:
    """The host's XCR<index> (XCR0: the enabled XSAVE state components)."""
    if not cpuid(1)[2] & CPUID1_ECX_OSXSAVE:
        raise HostCpuError("the host runs without CR4.OSXSAVE: xgetbv would fault")
    _, _, fn = _routines()
    return fn(index)
