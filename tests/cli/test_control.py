"""The control socket on its own (no guest): requests, console fan-out with
its backlog, and clients that send garbage, too much, or nothing."""
from __future__ import annotations

import json
import socket

import pytest

from pyvmm import control
from waiting import wait_for


class FakeGuest:
    def __init__(self):
        self.shutdowns, self.destroyed, self.input = [], False, bytearray()

    def info(self):
        return {"memory_mib": 64, "state": "running"}

    def shutdown(self, reason):
        self.shutdowns.append(reason)

    def destroy(self):
        self.destroyed = True

    def send_console_input(self, data):
        self.input += data


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_RUNTIME_DIR", str(tmp_path))
    guest = FakeGuest()
    srv = control.ControlServer("g1", guest)
    yield srv, guest
    srv.close()


def _raw(path, payload: bytes, timeout=10) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    s.sendall(payload)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def test_requests(server):
    srv, guest = server
    reply, s = control.request("g1", "info")
    s.close()
    assert reply["ok"] and reply["info"]["name"] == "g1" and reply["info"]["memory_mib"] == 64
    reply, s = control.request("g1", "shutdown", reason="reboot")
    s.close()
    assert reply["ok"] and guest.shutdowns == ["reboot"]
    reply, s = control.request("g1", "shutdown", reason="explode")
    s.close()
    assert not reply["ok"] and "unknown shutdown reason" in reply["error"]
    reply, s = control.request("g1", "destroy")
    s.close()
    assert reply["ok"]
    # the server answers before it destroys (the process may end right after)
    wait_for(lambda: guest.destroyed, "the destroy to reach the guest")
    assert [g["name"] for g in control.list_guests()] == ["g1"]
    with pytest.raises(control.GuestNotFound):
        control.request("g2", "info")


def test_bad_clients_get_an_error_and_the_server_goes_on(server):
    srv, guest = server
    for payload in (b"not json\n", b"[1, 2]\n", b'{"no": "op"}\n', b'{"op": "fly"}\n',
                    b"x" * 10000 + b"\n"):
        reply = json.loads(_raw(srv.path, payload))
        assert reply["ok"] is False and reply["error"], payload[:20]
    # a client that connects and says nothing is dropped after a while
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(srv.path))
    reply, s = control.request("g1", "info")        # served meanwhile
    s.close()
    assert reply["ok"]
    idle.close()


def test_console_backlog_and_fan_out(server):
    srv, guest = server
    srv.console_output(b"early boot line\n")
    a, sa = control.request("g1", "console")
    b, sb = control.request("g1", "console")
    assert a["ok"] and b["ok"]
    for s in (sa, sb):
        s.settimeout(10)
        assert s.recv(4096) == b"early boot line\n"
    wait_for(lambda: srv.console_clients == 2, "both console clients registered")
    srv.console_output(b"live\n")
    assert sa.recv(4096) == b"live\n" and sb.recv(4096) == b"live\n"
    sa.sendall(b"typed")
    wait_for(lambda: guest.input == b"typed", "the typed input to reach the guest")
    sa.close()
    srv.console_output(b"after one left\n")           # a gone client is dropped, not fatal
    assert sb.recv(4096) == b"after one left\n"
    sb.close()


def test_name_in_use_and_stale_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_RUNTIME_DIR", str(tmp_path))
    srv = control.ControlServer("dup", FakeGuest())
    try:
        with pytest.raises(control.NameInUse):
            control.ControlServer("dup", FakeGuest())
    finally:
        srv.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "dup.sock"))
    stale.close()                                     # its owner is gone
    srv = control.ControlServer("dup", FakeGuest())   # takes the name over
    srv.close()
    assert not (tmp_path / "dup.sock").exists()
