"""What a toolstack writes into xenstore for a guest (as libxl does):
the domain's standard tree and the directories of a split device.
"""
from __future__ import annotations

import uuid as uuid_mod

from ..abi import XenbusState
from .store import DOMID_FIRST_RESERVED, LOCAL_DOMAIN, XenstoreStore, domain_path
# ---------------------------------------------------------------------------
# Standard tree (XEN_PV_ABI.md §7.2/§7.3, as libxl builds it)
# ---------------------------------------------------------------------------


def _ro(domid: int) -> list[str]:
    """Owned by dom0, readable by the guest (libxl's "roperm")."""
    return ["n0", f"r{domid}"]


def _rw(domid: int) -> list[str]:
    """Owned by the guest, dom0 has full access anyway (libxl's "rwperm")."""
    return [f"n{domid}"]


def populate_domain(store: XenstoreStore, domid: int, name: str, memory_kib: int, vcpus: int,
                    uuid: str | None = None, console: dict | None = None,
                    vcpus_online: int | None = None) -> str:
    """Create /local/domain/<domid>, /local/domain/0 and /vm/<uuid>; return
    the domain path.  vcpus: the maximum (xl's maxvcpus), the first
    vcpus_online of them (default all) "online", the rest "offline" (the
    guest's hotplug watcher takes them down; `pyvmm vcpu-set` changes it)."""
    if not 0 < domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"bad domU domid {domid}")
    uuid = uuid or str(uuid_mod.uuid4())
    dom = domain_path(domid)
    vm = f"/vm/{uuid}"
    with store.transaction() as t:
        for p in ("/local", LOCAL_DOMAIN, "/vm", "/tool"):
            store.mkdir(p, t)
        d0 = domain_path(0)
        if not store.exists(f"{d0}/domid", t):
            store.write(f"{d0}/name", "Domain-0", t)
            store.write(f"{d0}/domid", "0", t)
            store.mkdir(f"{d0}/backend", t)
            store.set_perms(d0, ["n0"], t)
        store.mkdir(vm, t)
        store.set_perms(vm, _ro(domid), t)
        store.write(f"{vm}/name", name, t)
        store.write(f"{vm}/uuid", uuid, t)
        store.write(f"{vm}/image/ostype", "linux", t)

        store.mkdir(dom, t)
        store.set_perms(dom, _ro(domid), t)
        # Children created below inherit the domain dir's read-only perms.
        store.write(f"{dom}/domid", str(domid), t)
        store.write(f"{dom}/name", name, t)
        store.write(f"{dom}/vm", vm, t)
        store.write(f"{dom}/memory/target", str(memory_kib), t)
        store.write(f"{dom}/memory/static-max", str(memory_kib), t)
        online = vcpus if vcpus_online is None else vcpus_online
        for n in range(vcpus):
            store.write(f"{dom}/cpu/{n}/availability", "online" if n < online else "offline", t)
        store.mkdir(f"{dom}/device", t)
        store.mkdir(f"{dom}/control", t)
        # Linux checks this to use XS_RESET_WATCHES (HVM only); harmless for PV.
        store.write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1", t)
        store.write(f"{dom}/control/platform-feature-xs_reset_watches", "1", t)
        # Written by the guest: guest-owned.
        for p in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                  "control/feature-suspend", "control/sysrq", "data", "drivers", "error",
                  "feature", "attr"):
            full = f"{dom}/{p}"
            store.mkdir(full, t)
            store.set_perms(full, _rw(domid), t)
        cons = {"limit": "1048576", "type": "xenconsoled", "output": "pty"}
        cons.update(console or {})
        store.mkdir(f"{dom}/console", t)
        store.set_perms(f"{dom}/console", [f"n{domid}", "r0"], t)
        for k, v in cons.items():
            store.write(f"{dom}/console/{k}", str(v), t)
    return dom


def add_device(store: XenstoreStore, domid: int, kind: str, devid: int | str,
               frontend: dict, backend: dict, backend_domid: int = 0) -> tuple[str, str]:
    """Create a split device's frontend and backend directories (state Initialising).

    The frontend dir is owned by the guest and readable by the back-end
    domain; the backend dir is owned by the back-end domain and readable by
    the guest. Returns (frontend_path, backend_path).
    """
    fe = f"{domain_path(domid)}/device/{kind}/{devid}"
    be = f"{domain_path(backend_domid)}/backend/{kind}/{domid}/{devid}"
    init = str(int(XenbusState.Initialising))
    with store.transaction() as t:
        store.mkdir(fe, t)
        store.set_perms(fe, [f"n{domid}", f"r{backend_domid}"], t)
        fe_vals = {"backend": be, "backend-id": str(backend_domid), "state": init}
        fe_vals.update({k: str(v) for k, v in frontend.items()})
        for k, v in fe_vals.items():
            store.write(f"{fe}/{k}", v, t)  # inherits the frontend dir's perms
        store.mkdir(be, t)
        store.set_perms(be, [f"n{backend_domid}", f"r{domid}"], t)
        be_vals = {"frontend": fe, "frontend-id": str(domid), "online": "1", "state": init}
        be_vals.update({k: str(v) for k, v in backend.items()})
        for k, v in be_vals.items():
            store.write(f"{be}/{k}", v, t)
    return fe, be

