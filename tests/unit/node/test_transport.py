"""The node's front door without a network: the PDU guard on crafted byte streams (fed whole
and a byte at a time), and the allowed-hosts check."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from spleen_seg.node.transport import (
    MAX_ASSOCIATE_PDU_BYTES,
    MAX_COMMAND_BYTES,
    PduGuard,
    PeerLimitExceeded,
    host_allowed,
)

MAX_PDATA = 16382
MAX_INSTANCE = 10_000
COMMAND, LAST = 0x01, 0x02


def pdu(pdu_type: int, body: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if declared is None else declared) + body


def pdv(control: int, data: bytes, context: int = 1) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context, control) + data


def p_data(*items: bytes) -> bytes:
    return pdu(0x04, b"".join(items))


def feed(stream: bytes, bytewise: bool) -> PduGuard:
    guard = PduGuard(MAX_PDATA, MAX_INSTANCE)
    if bytewise:
        for k in range(len(stream)):
            guard.feed(stream[k:k + 1])
    else:
        guard.feed(stream)
    return guard


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_header_declaring_more_than_its_limit_is_refused_before_its_body(bytewise):
    with pytest.raises(PeerLimitExceeded, match="declared a 4294967295-byte A-ASSOCIATE-RQ PDU"):
        feed(pdu(0x01, b"", declared=0xFFFFFFFF), bytewise)
    with pytest.raises(PeerLimitExceeded, match=f"declared a {MAX_ASSOCIATE_PDU_BYTES + 1}-byte type 0x09 PDU"):
        feed(pdu(0x09, b"", declared=MAX_ASSOCIATE_PDU_BYTES + 1), bytewise)
    with pytest.raises(PeerLimitExceeded, match=f"{MAX_PDATA + 1}-byte P-DATA-TF PDU, more than the {MAX_PDATA} bytes"):
        feed(pdu(0x04, b"", declared=MAX_PDATA + 1), bytewise)


@pytest.mark.parametrize("bytewise", [False, True])
def test_pdus_within_their_limits_pass_and_the_association_request_is_noticed(bytewise):
    request = pdu(0x01, b"\x00" * 2000)
    guard = feed(request[:-1], bytewise)
    assert not guard.association_requested
    guard.feed(request[-1:])
    assert guard.association_requested
    guard.feed(pdu(0x01, b"", declared=MAX_ASSOCIATE_PDU_BYTES)[:6])  # at the limit: accepted
    at_limit = p_data(pdv(COMMAND | LAST, b"c" * (MAX_PDATA - 12 - 1000)), pdv(LAST, b"d" * 1000))
    assert len(at_limit) == 6 + MAX_PDATA
    feed(at_limit, bytewise)


@pytest.mark.parametrize("bytewise", [False, True])
def test_dataset_fragments_are_added_up_across_pdus_until_the_last(bytewise):
    fragment = b"d" * 4000
    stream = p_data(pdv(COMMAND | LAST, b"c" * 80)) + p_data(pdv(0, fragment), pdv(0, fragment)) \
        + p_data(pdv(LAST, b"d" * (MAX_INSTANCE - 2 * len(fragment))))
    guard = feed(stream, bytewise)  # exactly the limit: one whole message
    guard.feed(stream)  # the count starts again after the last fragment
    with pytest.raises(PeerLimitExceeded, match=f"dataset larger than {MAX_INSTANCE} bytes"):
        guard.feed(p_data(pdv(0, fragment), pdv(0, fragment), pdv(0, fragment)))


def test_command_fragments_are_bounded_too():
    guard = PduGuard(MAX_PDATA, MAX_INSTANCE)
    chunk = p_data(pdv(COMMAND, b"c" * (MAX_PDATA - 6)))
    with pytest.raises(PeerLimitExceeded, match=f"command set longer than {MAX_COMMAND_BYTES} bytes"):
        for _ in range(MAX_COMMAND_BYTES // (MAX_PDATA - 6) + 1):
            guard.feed(chunk)


def test_allowed_hosts_match_addresses_and_networks():
    networks = (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("192.168.5.7"), ipaddress.ip_network("::1"))
    assert host_allowed("10.1.200.3", networks) and host_allowed("192.168.5.7", networks)
    assert host_allowed("::ffff:10.1.2.3", networks)  # IPv4 on a dual-stack socket
    assert host_allowed("::1", networks)
    assert not host_allowed("10.2.0.1", networks) and not host_allowed("192.168.5.8", networks)
    assert not host_allowed("not-an-address", networks)
