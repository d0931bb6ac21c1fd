"""vmm.hostcpu: the host CPU's own CPUID and XCR0, cross-checked with what
the host kernel reports in /proc/cpuinfo."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.vmm import hostcpu

CPUINFO = Path("/proc/cpuinfo")
pytestmark = pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo")


def _cpuinfo(field: str) -> str:
    m = re.search(rf"^{field}\s*:\s*(.*)$", CPUINFO.read_text(), re.M)
    assert m, field
    return m.group(1)


def test_cpuid_vendor_and_feature_bits_match_the_kernel():
    _, ebx, ecx, edx = hostcpu.cpuid(0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode()
    assert vendor == _cpuinfo("vendor_id")
    flags = set(_cpuinfo("flags").split())
    _, _, ecx1, edx1 = hostcpu.cpuid(1)
    assert bool(edx1 >> 25 & 1) == ("sse" in flags)
    assert bool(ecx1 >> 26 & 1) == ("xsave" in flags)
    assert bool(hostcpu.cpuid(7, 0)[1] >> 5 & 1) == ("avx2" in flags)


def test_xgetbv_matches_the_kernels_view_of_xsave_state():
    if not hostcpu.cpuid(1)[2] & hostcpu.CPUID1_ECX_OSXSAVE:
        with pytest.raises(hostcpu.HostCpuError):
            hostcpu.xgetbv(0)
        return
    xcr0 = hostcpu.xgetbv(0)
    assert xcr0 & 3 == 3                      # x87 and SSE always
    flags = set(_cpuinfo("flags").split())
    assert bool(xcr0 >> 2 & 1) == ("avx" in flags)
    assert bool(xcr0 >> 5 & 7 == 7) == ("avx512f" in flags)
