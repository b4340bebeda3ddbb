"""Parsing the serve flags: destinations, AE titles, ports, STOW-RS URLs, TLS files."""

from __future__ import annotations

import pytest

from spleen_seg.errors import NodeError
from spleen_seg.node.settings import (
    Destination,
    NodeSettings,
    check_connection_limit,
    check_tls,
    format_size,
    parse_ae_list,
    parse_ae_title,
    parse_destination,
    parse_host_list,
    parse_port,
    parse_size,
    parse_stow_url,
)


def test_destination_forms():
    assert parse_destination("ORTHANC@pacs.example.org:4242") == Destination("ORTHANC", "pacs.example.org", 4242)
    assert parse_destination("PACS@[::1]:104") == Destination("PACS", "::1", 104)
    assert str(Destination("PACS", "::1", 104)) == "PACS@[::1]:104"
    assert str(parse_destination("A B@10.0.0.1:11112")) == "A B@10.0.0.1:11112"


@pytest.mark.parametrize("text, message", [
    ("pacs.example.org:4242", "not AE@HOST:PORT"),
    ("ORTHANC@pacs.example.org", "not AE@HOST:PORT"),
    ("ORTHANC@:4242", "not AE@HOST:PORT"),
    ("ORTHANC@host:http", "port 'http' is not a number"),
    ("ORTHANC@host:70000", "port 70000 is out of range"),
    ("WAY_TOO_LONG_AE_TITLE@host:104", "not a DICOM AE title"),
    ("BACK\\SLASH@host:104", "not a DICOM AE title"),
])
def test_bad_destinations_say_what_is_wrong(text, message):
    with pytest.raises(NodeError, match=message):
        parse_destination(text)


def test_ae_titles():
    assert parse_ae_title("  SPLEENSEG ") == "SPLEENSEG"
    assert parse_ae_list("ORTHANC, PACS,") == ("ORTHANC", "PACS")
    with pytest.raises(NodeError, match="names no AE title"):
        parse_ae_list(" , ")
    with pytest.raises(NodeError, match="not a DICOM AE title"):
        parse_ae_title("")


def test_port_and_stow_url():
    assert parse_port("104") == 104
    with pytest.raises(NodeError, match="out of range"):
        parse_port("0")
    assert parse_stow_url("http://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"
    with pytest.raises(NodeError, match="not an http"):
        parse_stow_url("pacs:8042/dicom-web")


def test_targets_list_cstore_then_stow(tmp_path):
    settings = NodeSettings(spool=tmp_path, destinations=(Destination("A", "h", 1),), stow_url="http://h/dw")
    assert settings.targets == ("A@h:1", "http://h/dw")


def test_tls_needs_certificate_and_key(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c")
    key.write_text("k")
    assert check_tls(None, None, None) is None
    assert check_tls(cert, key, None).ca is None
    with pytest.raises(NodeError, match="both --tls-cert and --tls-key"):
        check_tls(cert, None, None)
    with pytest.raises(NodeError, match="--tls-ca needs"):
        check_tls(None, None, cert)
    with pytest.raises(NodeError, match="TLS file not found"):
        check_tls(cert, key, tmp_path / "missing.pem")


def test_allowed_hosts_and_sizes(tmp_path):
    assert [str(n) for n in parse_host_list("10.1.2.3, 192.168.0.0/24,::1,")] == ["10.1.2.3/32", "192.168.0.0/24",
                                                                                "::1/128"]
    with pytest.raises(NodeError, match="'pacs.example.org' is not an IP address or network"):
        parse_host_list("10.1.2.3,pacs.example.org")
    with pytest.raises(NodeError, match="names no address"):
        parse_host_list(" , ")
    assert [parse_size(t) for t in ("100GiB", "512MB", "2.5 kb", "4096", "1B")] == [100 * 2**30, 512 * 10**6, 2500, 4096,
                                                                                   1]
    # One grammar with SPLEEN_SEG_MEMORY_LIMIT (config.parse_byte_size): a bare letter is binary
    assert [parse_size(t) for t in ("8G", "8g", "512M", "1.5T")] == [8 * 2**30, 8 * 2**30, 512 * 2**20, 3 * 2**39]
    for bad in ("", "ten GB", "-1GB", "1 PB", "0", "8GG"):
        with pytest.raises(NodeError, match="size"):
            parse_size(bad)
    assert [format_size(n) for n in (2**30, 100 * 2**30, 1536 * 2**10, 1000)] == ["1GiB", "100GiB", "1536KiB", "1000B"]
    settings = NodeSettings(spool=tmp_path, max_associations=3)
    assert settings.connection_limit == 6 and NodeSettings(spool=tmp_path, max_connections=4).connection_limit == 4
    assert check_connection_limit(None, 10) is None and check_connection_limit(10, 10) == 10
    with pytest.raises(NodeError, match="--max-connections 3 is below --max-associations 10"):
        check_connection_limit(3, 10)
