"""What the handles on this process's file descriptors share: KVM's system,
VM and vCPU fds and guest memory's memfd close once (by close() or at the end
of a with block), and the ones that map their fd unmap it the same way."""
from __future__ import annotations

import mmap
import os

__all__ = ["FdHandle", "unmap"]


class FdHandle:
    """A file descriptor that close(), or the end of a with block, closes once."""
    fd: int

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unmap(mapping: mmap.mmap, view: memoryview) -> None:
    """Release our own view of `mapping` and unmap it. Where someone else still
    holds a view, the mapping stays until that view goes (the GC unmaps it)."""
    try:
        view.release()
    except BufferError:
        pass
    try:
        mapping.close()
    except BufferError:
        pass
