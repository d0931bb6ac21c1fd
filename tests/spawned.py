"""A pyvmm (or any) command run by a test with its stdin a pipe and its
stdout/stderr collected by threads as they arrive."""
from __future__ import annotations

import subprocess
import threading
import time


class Spawned:
    def __init__(self, argv: list[str], env: dict | None = None, cwd=None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=cwd)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True)]
        for r in self._readers:
            r.start()

    @staticmethod
    def _pump(src, dst: bytearray) -> None:
        for chunk in iter(lambda: src.read1(4096), b""):
            dst.extend(chunk)

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, cond, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline or not self.alive():
                return cond()
            time.sleep(0.05)
        return True

    def ask_status(self, signum, timeout: float = 10) -> str:
        """Send pyvmm its status signal; the new report it prints on stderr
        (from its heading to its vcpu_info line), or "" if none came."""
        reports = self.err.count(b"vcpu_info:")
        if self.alive():
            self.proc.send_signal(signum)
            self.wait_for(lambda: self.err.count(b"vcpu_info:") > reports, timeout)
        if self.err.count(b"vcpu_info:") == reports:
            return ""
        text = self.stderr
        return text[text.rindex("pyvmm: status after"):]

    def stalled(self, error: AssertionError, status_signal) -> AssertionError:
        """The error with pyvmm's own account added: its status report if it
        is still running, its exit status and stderr."""
        self.ask_status(status_signal)
        self.finish()
        return AssertionError(f"{error}\npyvmm exit status {self.proc.returncode}, stderr:\n"
                              f"{self.stderr[-5000:]}")

    def finish(self) -> int | None:
        """Kill it if still running, collect what it wrote; its exit status."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(60)
        for r in self._readers:
            r.join(5)
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")
