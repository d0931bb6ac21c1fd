"""Observers of a Domain (xen_abi/hypervisor/domain.py): who wants to see its
exits, slow hypercalls or console output registers a listener instead of
replacing the domain's methods.

    dom.on_vcpu_exit.add(lambda ex: ...)                # every KVM exit of the run loop
    dom.on_hypercall.add(lambda call: ...)              # every slow hypercall (a SlowHypercall)
    dom.on_console_output.add(lambda data: ...)         # every piece of guest console text

A listener runs synchronously on the thread where the event happens (the
vCPU thread; console output also on the back-end thread that drains the
console ring), so it should be short.  A listener that raises is logged and
the domain goes on: watching a guest (tracing, echoing its console) must
never be what kills it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["Listeners", "SlowHypercall"]


class Listeners:
    """The listeners of one kind of event, called in the order added."""

    def __init__(self, event: str):
        self.event = event
        self._listeners: list[Callable] = []

    def add(self, listener: Callable) -> Callable:
        self._listeners.append(listener)
        return listener

    def __call__(self, *args) -> None:
        for listener in self._listeners:
            try:
                listener(*args)
            except Exception:
                log.exception("%s listener %r failed", self.event, listener)


@dataclass(frozen=True)
class SlowHypercall:
    """One hypercall the shim passed to Python, once it was handled."""
    vcpu_id: int
    nr: int
    args: tuple[int, ...]
    rip: int                              # guest RIP that issued it
    result: int | None = None             # what the dispatcher returned to the guest
    error: BaseException | None = None    # raised instead (DomainShutdown ends the domain)
