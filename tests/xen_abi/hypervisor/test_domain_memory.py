"""What a built domain keeps in the host process (issue 8: overhead per
guest).  The loaded kernel's segments (~44 MiB for Debian's cloud kernel)
are copied into guest RAM by the builder; nothing may hold them after."""
from __future__ import annotations

import gc
import weakref

from pyvmm.guests.testguests import build_testguest
from pyvmm.xen_abi.boot.loader import load_kernel
from pyvmm.xen_abi.hypervisor.domain import Domain


def test_a_built_domain_holds_no_copy_of_the_kernel_image():
    kernel = load_kernel(build_testguest("hello").read_bytes())
    alive = weakref.ref(kernel)
    with Domain(kernel) as dom:
        del kernel
        gc.collect()
        assert alive() is None, gc.get_referrers(alive())
        res = dom.run(timeout=30)
    assert "TESTGUEST hello: PASS" in res.text



def test_a_guest_process_does_not_import_numpy():
    """Everything a running guest's process loads, without numpy (its import
    alone costs each guest process ~8 MiB); the tests use it on their own."""
    import subprocess
    import sys

    code = ("import sys, pyvmm.cli, pyvmm.launch, pyvmm.control, pyvmm.backends.blkback, "
            "pyvmm.backends.netback, pyvmm.xen_abi.hypervisor.domain, pyvmm.guests.default; "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
