"""The xenstore wire protocol: one request (type, tx_id, payload) executed
against a XenstoreStore on behalf of one connection, and the reply framing.
Guest input is never trusted: a malformed request raises XenstoreError,
which the transport turns into an XS_ERROR reply.
"""
from __future__ import annotations

import logging

from ..abi import XenErrno, XsdSockmsg, XsType
from .store import (DOMID_FIRST_RESERVED, OK, Connection, XenstoreStore, domain_path,
                    xs_error)

log = logging.getLogger(__name__)
# ---------------------------------------------------------------------------
# The wire protocol
# ---------------------------------------------------------------------------

# Requests that ignore tx_id (xenstore.txt: "The tx_id in a WATCH request is ignored").
_NO_TX = {XsType.WATCH, XsType.UNWATCH}
_PRIVILEGED_ONLY = {XsType.CONTROL, XsType.INTRODUCE, XsType.RELEASE, XsType.RESUME, XsType.SET_TARGET}


def split_strings(payload: bytes) -> list[str]:
    """Split NUL-terminated strings; EINVAL if the last one lacks its NUL."""
    if not payload or payload[-1] != 0:
        raise xs_error(XenErrno.EINVAL, "argument not NUL-terminated")
    return [s.decode("latin-1") for s in payload[:-1].split(b"\0")]


def _onearg(payload: bytes) -> str:
    args = split_strings(payload)
    if len(args) != 1:
        raise xs_error(XenErrno.EINVAL, "expected one argument")
    return args[0]


def _domid_arg(s: str) -> int:
    if not s.isdigit() or int(s) >= DOMID_FIRST_RESERVED:
        raise xs_error(XenErrno.EINVAL, f"bad domid {s!r}")
    return int(s)


def handle_request(store: XenstoreStore, conn: Connection, mtype: int, tx_id: int,
                   payload: bytes) -> bytes:
    """Execute one request; return the success payload or raise XenstoreError."""
    try:
        t = XsType(mtype)
    except ValueError:
        raise xs_error(XenErrno.EINVAL, f"unknown message type {mtype}") from None
    if t in (XsType.WATCH_EVENT, XsType.ERROR):
        raise xs_error(XenErrno.EINVAL, f"{t.name} is not a request")
    if t in _PRIVILEGED_ONLY and not conn.privileged:
        raise xs_error(XenErrno.EACCES, f"{t.name} is for dom0 only")
    if t not in _NO_TX and tx_id != 0 and tx_id not in conn.transactions:
        raise xs_error(XenErrno.ENOENT, f"no transaction {tx_id}")

    if t == XsType.READ:
        return store.op_read(conn, tx_id, _onearg(payload))
    if t == XsType.WRITE:
        nul = payload.find(b"\0")
        if nul < 0:
            raise xs_error(XenErrno.EINVAL, "WRITE without path terminator")
        store.op_write(conn, tx_id, payload[:nul].decode("latin-1"), payload[nul + 1:])
        return OK
    if t == XsType.MKDIR:
        store.op_mkdir(conn, tx_id, _onearg(payload))
        return OK
    if t == XsType.RM:
        store.op_rm(conn, tx_id, _onearg(payload))
        return OK
    if t == XsType.DIRECTORY:
        return b"".join(c.encode() + b"\0" for c in store.op_directory(conn, tx_id, _onearg(payload)))
    if t == XsType.DIRECTORY_PART:
        args = split_strings(payload)
        if len(args) != 2 or not args[1].isdigit():
            raise xs_error(XenErrno.EINVAL, "DIRECTORY_PART wants path and offset")
        return store.op_directory_part(conn, tx_id, args[0], int(args[1]))
    if t == XsType.GET_PERMS:
        return b"".join(p.encode() + b"\0" for p in store.op_get_perms(conn, tx_id, _onearg(payload)))
    if t == XsType.SET_PERMS:
        args = split_strings(payload)
        if len(args) < 2:
            raise xs_error(XenErrno.EINVAL, "SET_PERMS wants path and permissions")
        store.op_set_perms(conn, tx_id, args[0], args[1:])
        return OK
    if t == XsType.UNWATCH:
        args = split_strings(payload)
        if len(args) < 2:
            raise xs_error(XenErrno.EINVAL, "UNWATCH wants path and token")
        store.op_unwatch(conn, args[0], args[1])
        return OK
    if t == XsType.TRANSACTION_START:
        if tx_id != 0:
            raise xs_error(XenErrno.EBUSY, "TRANSACTION_START inside a transaction")
        return str(store.op_transaction_start(conn)).encode() + b"\0"
    if t == XsType.TRANSACTION_END:
        arg = _onearg(payload)
        if arg not in ("T", "F") or tx_id == 0:
            raise xs_error(XenErrno.EINVAL, "TRANSACTION_END wants T or F and a transaction")
        store.op_transaction_end(conn, tx_id, arg == "T")
        return OK
    if t == XsType.GET_DOMAIN_PATH:
        return domain_path(_domid_arg(_onearg(payload))).encode() + b"\0"
    if t == XsType.IS_DOMAIN_INTRODUCED:
        return b"T\0" if store.domain_introduced(_domid_arg(_onearg(payload))) else b"F\0"
    if t == XsType.RESET_WATCHES:
        store.reset_connection(conn)
        return OK
    if t == XsType.CONTROL:
        args = split_strings(payload)
        if args[0] == "print" and len(args) > 1:
            log.info("xenstore control print: %s", args[1])
            return OK
        if args[0] == "help":
            return b"print\nhelp\n\0"
        raise xs_error(XenErrno.EINVAL, f"unknown control command {args[0]!r}")
    if t == XsType.INTRODUCE:
        store.introduce_domain(_domid_arg(split_strings(payload)[0]))
        return OK
    if t in (XsType.RELEASE, XsType.RESUME):
        domid = _domid_arg(split_strings(payload)[0])
        if t == XsType.RELEASE:
            store.release_domain(domid)
        return OK
    # WATCH is handled by the transport (its first event must follow the reply);
    # SET_TARGET has no meaning in a single-guest VMM.
    raise xs_error(XenErrno.ENOSYS, f"{t.name} not supported")


def encode_msg(mtype: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return XsdSockmsg.build(dict(type=mtype, req_id=req_id, tx_id=tx_id, len=len(payload))) + payload


def error_msg(req_id: int, tx_id: int, errno: XenErrno) -> bytes:
    return encode_msg(XsType.ERROR, req_id, tx_id, errno.name.encode() + b"\0")


