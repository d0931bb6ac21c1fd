"""What every pyvmm command shares about failing: the exit statuses, the
user's mistake as an exception, and the one line that reports it."""
from __future__ import annotations

import enum
import sys


class ExitStatus(enum.IntEnum):
    """pyvmm's exit status tells how the guest ended."""

    POWEROFF = 0  # the guest powered off (SCHEDOP_shutdown poweroff)
    CRASH = 1  # the guest crashed (SHUTDOWN_crash, a fatal fault, a shim error)
    USAGE = 2  # bad command line or input files: nothing was started
    REBOOT = 3  # the guest asked to reboot and --on-reboot=exit was given
    DETACHED = 4  # the guest was destroyed: the escape key, or `pyvmm destroy`
    HOST_ERROR = 5  # the host could not run the guest (/dev/kvm, resources)


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def print_error(message: str) -> None:
    """The one line on stderr that says what is wrong and what to do."""
    print(f"pyvmm: error: {message}", file=sys.stderr)
