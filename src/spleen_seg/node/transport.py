"""The node's front door: what a peer may cost before and after it is known.

pynetdicom 3.0 reads a PDU of whatever length the peer declares (up to 4 GiB) into memory
before the calling AE title or the association limit is checked, gives each TCP connection
a thread with no limit on their number, does the TLS handshake inside its accept loop with
no timeout (one silent connection stops every other peer), and reads from sockets without a
timeout (a peer that stops in the middle of a PDU holds its thread forever). Its own hooks
bound all of this here, without patching it:

- ``GuardedServer`` (a ``ThreadedAssociationServer``, built by ``AE.make_server``) checks
  the peer's address against ``--allowed-hosts`` and counts connections at accept, before a
  byte is read; it accepts without the handshake, which each connection's thread then does
  with a timeout;
- ``GuardedSocket`` (an ``AssociationSocket``, set by ``GuardedRequestHandler``) reads with
  timeouts and follows the PDU stream (``PduGuard``), dropping the peer at the first header
  that declares more than a limit, or at the first fragment past the dataset limit.

A peer that breaks a limit is dropped (its socket shut down; pynetdicom sees the connection
close and aborts the association) and logged as ``event=connection result=dropped``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from spleen_seg.node.bookkeeper import log_event

if TYPE_CHECKING:
    from pynetdicom.association import Association

logger = logging.getLogger(__name__)

# A real A-ASSOCIATE-RQ is a few kB: storescu's default one (every storage class it knows,
# 3 transfer syntaxes each) is 9.6 kB, and a user identity item (a Kerberos ticket or a SAML
# assertion) adds at most 2 x 65535 bytes. Anything declared larger, before the peer is
# known, is refused (dcmtk's association-request limit plays the same role).
MAX_ASSOCIATE_PDU_BYTES = 256 * 1024
# A command set is a few hundred bytes (PS3.7 E.1); its fragments are bounded separately
# because pynetdicom gathers them in memory too.
MAX_COMMAND_BYTES = 64 * 1024
PDU_HEADER = struct.Struct(">BBL")  # type, reserved, length of what follows
PDV_HEADER = struct.Struct(">LBB")  # item length (context id, control header and data), context id, control header
P_DATA_TF = 0x04
A_ASSOCIATE_RQ = 0x01
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
COMMAND_FRAGMENT = 0x01  # message control header bits (PS3.8 E.2)
LAST_FRAGMENT = 0x02
RECV_CHUNK_BYTES = 64 * 1024
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class PeerLimits:
    """What one peer may make the node hold or wait for (see ``NodeSettings`` for the defaults)."""

    max_connections: int
    idle_timeout_seconds: float
    max_pdata_bytes: int  # the maximum PDU length the node announces in its A-ASSOCIATE-AC
    max_instance_bytes: int
    allowed_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


class PeerLimitExceeded(Exception):
    """The peer broke a limit; the message says which, for the log line."""


def host_allowed(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """True when ``address`` (as accept() reports it) lies in one of ``networks``; IPv4-mapped IPv6 counts as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _fill(header: bytearray, view: memoryview, size: int) -> memoryview:
    """Move bytes from ``view`` into ``header`` until it holds ``size``; returns the rest of ``view``."""
    taken = min(size - len(header), len(view))
    header += view[:taken]
    return view[taken:]


class PduGuard:
    """Follows the bytes a peer sends, PDU by PDU and fragment by fragment, and raises
    ``PeerLimitExceeded`` at the first byte past a limit, whatever the size of the reads.

    - a PDU header declaring more than its type's maximum (a P-DATA-TF longer than the
      maximum PDU length announced, any other PDU longer than ``MAX_ASSOCIATE_PDU_BYTES``);
    - a message whose dataset (or command set) fragments add up past their maximum.
    """

    def __init__(self, max_pdata_bytes: int, max_instance_bytes: int):
        self.max_pdata_bytes = max_pdata_bytes
        self.max_instance_bytes = max_instance_bytes
        self.association_requested = False  # a whole A-ASSOCIATE-RQ went through
        self._header = bytearray()
        self._pdu_type = 0
        self._body_left = 0
        self._pdv_header = bytearray()
        self._pdv_left = 0
        self._pdv_control = 0
        self._dataset_bytes = 0
        self._command_bytes = 0

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            if self._body_left == 0:
                view = _fill(self._header, view, PDU_HEADER.size)
                if len(self._header) == PDU_HEADER.size:
                    self._start_pdu(*PDU_HEADER.unpack(self._header))
                continue
            taken = min(self._body_left, len(view))
            if self._pdu_type == P_DATA_TF:
                self._feed_pdvs(view[:taken])
            self._body_left -= taken
            view = view[taken:]
            if self._body_left == 0 and self._pdu_type == A_ASSOCIATE_RQ:
                self.association_requested = True

    def _start_pdu(self, pdu_type: int, _reserved: int, length: int) -> None:
        self._header.clear()
        name = PDU_NAMES.get(pdu_type, f"type 0x{pdu_type:02X}")
        if pdu_type == P_DATA_TF and length > self.max_pdata_bytes:
            raise PeerLimitExceeded(f"sent a {length}-byte {name} PDU, more than the {self.max_pdata_bytes} bytes "
                                    "this node announced as its maximum PDU length")
        if pdu_type != P_DATA_TF and length > MAX_ASSOCIATE_PDU_BYTES:
            raise PeerLimitExceeded(f"declared a {length}-byte {name} PDU; at most {MAX_ASSOCIATE_PDU_BYTES} bytes "
                                    "are read of a PDU other than P-DATA-TF")
        self._pdu_type, self._body_left = pdu_type, length
        self._pdv_header.clear()
        self._pdv_left = 0
        if length == 0 and pdu_type == A_ASSOCIATE_RQ:
            self.association_requested = True

    def _feed_pdvs(self, view: memoryview) -> None:
        while view:
            if self._pdv_left == 0:
                view = _fill(self._pdv_header, view, PDV_HEADER.size)
                if len(self._pdv_header) == PDV_HEADER.size:
                    item_length, _context, self._pdv_control = PDV_HEADER.unpack(self._pdv_header)
                    self._pdv_header.clear()
                    # The item length counts the context id and the control header.
                    self._pdv_left = max(item_length - 2, 0)
                    if self._pdv_left == 0:
                        self._end_fragment()
                continue
            taken = min(self._pdv_left, len(view))
            self._count(taken)
            self._pdv_left -= taken
            view = view[taken:]
            if self._pdv_left == 0:
                self._end_fragment()

    def _count(self, count: int) -> None:
        if self._pdv_control & COMMAND_FRAGMENT:
            self._command_bytes += count
            if self._command_bytes > MAX_COMMAND_BYTES:
                raise PeerLimitExceeded(f"sent a command set longer than {MAX_COMMAND_BYTES} bytes")
        else:
            self._dataset_bytes += count
            if self._dataset_bytes > self.max_instance_bytes:
                raise PeerLimitExceeded(f"sent a dataset larger than {self.max_instance_bytes} bytes "
                                        "(--max-instance-size)")

    def _end_fragment(self) -> None:
        if self._pdv_control & LAST_FRAGMENT:
            if self._pdv_control & COMMAND_FRAGMENT:
                self._command_bytes = 0
            else:
                self._dataset_bytes = 0


class GuardedSocket(AssociationSocket):
    """An ``AssociationSocket`` whose reads have timeouts and pass through a ``PduGuard``.

    Timeouts: until the peer's A-ASSOCIATE-RQ is complete, every read waits at most what is
    left of ``idle_timeout_seconds`` since the connection (a peer trickling a byte at a time
    cannot hold a connection longer); afterwards each read waits at most
    ``idle_timeout_seconds`` (a peer that stops in the middle of a PDU). A silent established
    association is pynetdicom's own network timeout, set to the same value.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, limits: PeerLimits, address: str):
        super().__init__(assoc, client_socket=client_socket)
        self.limits = limits
        self.address = address
        self.guard = PduGuard(limits.max_pdata_bytes, limits.max_instance_bytes)
        self.dropped: str | None = None
        self._request_deadline = time.monotonic() + limits.idle_timeout_seconds

    def recv(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes`` bytes; fewer when the peer closed, and none once it was dropped.

        A short read is how pynetdicom's DUL learns that the connection is over (it then
        aborts the association), exactly as when the peer closes.
        """
        data = bytearray()
        while len(data) < nr_bytes and self.socket is not None and self.dropped is None:
            timeout = self._read_timeout()
            if timeout <= 0:
                self.drop(f"no complete association request within {self.limits.idle_timeout_seconds:g} s "
                          "of connecting")
                break
            self.socket.settimeout(timeout)
            try:
                chunk = self.socket.recv(min(RECV_CHUNK_BYTES, nr_bytes - len(data)))
            except TimeoutError:
                self.drop(f"sent nothing for {self.limits.idle_timeout_seconds:g} s in the middle of a PDU"
                          if self.guard.association_requested else
                          f"no complete association request within {self.limits.idle_timeout_seconds:g} s "
                          "of connecting")
                break
            except OSError:  # reset by the peer, or TLS broken: the connection is over
                return data
            if not chunk:
                return data
            try:
                self.guard.feed(chunk)
            except PeerLimitExceeded as err:
                self.drop(str(err))
                break
            data += chunk
        return bytearray() if self.dropped is not None else data

    def _read_timeout(self) -> float:
        if self.guard.association_requested:
            return self.limits.idle_timeout_seconds
        return min(self.limits.idle_timeout_seconds, self._request_deadline - time.monotonic())

    def drop(self, reason: str) -> None:
        """Log the peer and shut its socket down (pynetdicom closes it when it sees the end)."""
        self.dropped = reason
        calling = str(getattr(self.assoc.requestor, "ae_title", "") or "").strip()  # empty before the request
        log_event(logger, "connection", result="dropped", address=self.address, calling_ae=calling, reason=reason,
                  level=logging.WARNING)
        if self.socket is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                self.socket.shutdown(socket.SHUT_RDWR)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler with a ``GuardedSocket``, holding its thread until the association ends."""

    server: GuardedServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Upstream wrapped the connection in a plain AssociationSocket, whose constructor queued
        # the DUL's transport-connection event (Evt5). The DUL has not started, so the socket can
        # still be replaced: take that event back, then set ours (whose constructor queues it again).
        assoc.dul.event_queue.get_nowait()
        assoc.dul.socket = None
        assoc.set_socket(GuardedSocket(assoc, self.request, self.server.limits, str(self.client_address[0])))
        self.association = assoc
        return assoc

    def handle(self) -> None:
        super().handle()
        # A connection counts until it closes: wait here, in the connection's own thread, for
        # the association's thread (the server releases the connection when this returns).
        self.association.join()


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with allowed hosts and a connection limit at accept, and the TLS
    handshake (with a timeout) in each connection's thread instead of the accept loop."""

    daemon_threads = True
    block_on_close = False  # stopping the node does not wait for peers' connections to end
    # socketserver listens with a backlog of 5: a burst of connections beyond it waits in the
    # client's SYN retries (a second or more) before it is even seen, let alone refused.
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, ae: Any, address: tuple[str, int], ae_title: str, contexts: list, ssl_context: Any = None,
                 evt_handlers: list | None = None, *, limits: PeerLimits):
        self.limits = limits
        self._open = 0
        self._open_lock = threading.Lock()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GuardedRequestHandler)

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return self._open

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only; upstream would do the TLS handshake here, in the accept loop, without a timeout."""
        client, address = cast(socket.socket, self.socket).accept()  # bound and listening since __init__
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook before a connection gets a thread: allowed hosts, then the connection limit."""
        address = str(client_address[0])
        if self.limits.allowed_hosts and not host_allowed(address, self.limits.allowed_hosts):
            log_event(logger, "connection", result="refused", address=address, reason="address not in --allowed-hosts",
                      level=logging.WARNING)
            return False
        with self._open_lock:
            full = self._open >= self.limits.max_connections
            if not full:
                self._open += 1
        if full:
            log_event(logger, "connection", result="refused", address=address,
                      reason=f"{self.limits.max_connections} connections already open (--max-connections)",
                      level=logging.WARNING)
        return not full

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the connection will not release itself
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """One connection, in its own thread: the TLS handshake, then the association, to its end."""
        connection = request
        try:
            connection = self._start_tls(request, str(client_address[0]))
            if connection is not None:
                self.finish_request(connection, client_address)
        except Exception:  # noqa: BLE001 - as socketserver: report, close, serve the others
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(connection if connection is not None else request)
            self._release()

    def _start_tls(self, raw: socket.socket, address: str) -> socket.socket | None:
        if self.ssl_context is None:
            return raw
        timeout = self.limits.idle_timeout_seconds
        raw.settimeout(timeout)  # bounds the whole handshake (CPython's SSL handshake keeps one deadline)
        try:
            return self.ssl_context.wrap_socket(raw, server_side=True)
        except TimeoutError:
            reason = f"no TLS handshake within {timeout:g} s"
        except (ssl.SSLError, OSError) as err:
            reason = f"TLS handshake failed ({err.__class__.__name__}: {err})"
        log_event(logger, "connection", result="dropped", address=address, reason=reason, level=logging.WARNING)
        raw.close()
        return None

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket.

        Upstream's ``shutdown`` also removes the server from its AE's list, which only
        ``AE.start_server`` fills; this server comes from ``AE.make_server``.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()
