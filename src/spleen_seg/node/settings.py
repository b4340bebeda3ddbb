"""What a node is asked to do: the ``serve`` flags as one typed value, and their parsers.

Every parser raises ``NodeError`` naming the value, what was expected and an example, so
the CLI can turn it into a one-line flag error before anything starts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from spleen_seg.config import SIZE_EXAMPLES, SIZE_UNITS, parse_byte_size
from spleen_seg.errors import NodeError

DEFAULT_AE_TITLE = "SPLEENSEG"
DEFAULT_PORT = 11112
DEFAULT_HOST = "0.0.0.0"
DEFAULT_QUIET_SECONDS = 10.0
# Below this a series could complete between two instances of one transfer.
MIN_QUIET_SECONDS = 0.5
DEFAULT_KEEP_DAYS = 7.0
# pynetdicom's own default; each association is one thread.
DEFAULT_MAX_ASSOCIATIONS = 10
# TCP connections, handshaking or associated: by default twice the associations, so a peer
# over the association limit still gets a DICOM rejection (transient) rather than a closed
# socket, while a flood of connections is cut at the accept.
CONNECTIONS_PER_ASSOCIATION = 2
# A connection that sends nothing for this long is closed; the TLS handshake, then the
# association request, must each be complete within this long. dcmtk's and pynetdicom's
# ACSE timeout.
DEFAULT_IDLE_TIMEOUT_SECONDS = 30.0
MIN_IDLE_TIMEOUT_SECONDS = 0.5
MIB = 1024**2
GIB = 1024**3
# The largest CT instance a PACS sends is an Enhanced CT (one multi-frame instance per
# acquisition): 2000 frames of 512 x 512 x 16 bits (a 1 m scan at 0.5 mm) are 1000 MiB.
# Single-frame slices are 0.5 MiB (512^2), 2 MiB (1024^2), 8 MiB (2048^2, ultra-high
# resolution). While an instance arrives pynetdicom holds it in memory (and decoding and
# writing copy it), so the node's worst case is a few times --max-associations times this.
DEFAULT_MAX_INSTANCE_BYTES = 1 * GIB
# Received instances the spool holds at most (results are not counted): about 300 CT series
# of 600 slices, two weeks of 20 series a day under the default --keep-days 7.
DEFAULT_SPOOL_QUOTA_BYTES = 100 * GIB
# The largest CT series: a 0.5 mm reconstruction of a 2 m whole-body scan is 4000 slices.
DEFAULT_MAX_SERIES_INSTANCES = 5000
# DICOM AE titles: 1-16 characters of the default character repertoire, no backslash or
# control characters; leading/trailing spaces are not significant (PS3.5 6.2, VR AE).
AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
MAX_PORT = 65535


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives results by C-STORE."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for DICOM over TLS: the node's certificate and key; ``ca`` makes client certificates required."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class NodeSettings:
    """Everything ``spleen-seg serve`` was asked for; see ``spleen-seg serve --help``."""

    spool: Path
    ae_title: str = DEFAULT_AE_TITLE
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allowed_callers: tuple[str, ...] = ()
    allowed_hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS
    max_connections: int | None = None  # None: CONNECTIONS_PER_ASSOCIATION x max_associations
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES
    spool_quota_bytes: int = DEFAULT_SPOOL_QUOTA_BYTES
    max_series_instances: int = DEFAULT_MAX_SERIES_INSTANCES
    quiet_seconds: float = DEFAULT_QUIET_SECONDS
    destinations: tuple[Destination, ...] = ()
    stow_url: str | None = None
    send_report: bool = False
    keep_days: float = DEFAULT_KEEP_DAYS
    tls: TlsFiles | None = None
    weights: Path | None = None
    weights_convention: str | None = None
    device: str = "auto"
    backend: str = "auto"
    largest_component: bool = False

    @property
    def connection_limit(self) -> int:
        """Simultaneous TCP connections accepted (``--max-connections``, else twice the associations)."""
        if self.max_connections is not None:
            return self.max_connections
        return CONNECTIONS_PER_ASSOCIATION * self.max_associations

    @property
    def targets(self) -> tuple[str, ...]:
        """Where every result goes: ``AE@HOST:PORT`` for C-STORE, the URL for STOW-RS."""
        return tuple(str(d) for d in self.destinations) + ((self.stow_url,) if self.stow_url else ())


def parse_ae_title(text: str, what: str = "AE title") -> str:
    """A DICOM AE title (1-16 characters, no backslash), stripped of surrounding spaces."""
    title = text.strip()
    if not AE_TITLE_PATTERN.match(title):
        raise NodeError(f"{what} '{text}' is not a DICOM AE title: use 1 to 16 plain characters without "
                        "backslash, e.g. SPLEENSEG")
    return title


def parse_ae_list(text: str) -> tuple[str, ...]:
    """``AE1,AE2`` -> ``("AE1", "AE2")``; each must be an AE title."""
    titles = tuple(parse_ae_title(part, "calling AE title") for part in text.split(",") if part.strip())
    if not titles:
        raise NodeError(f"'{text}' names no AE title; pass a comma-separated list such as ORTHANC,PACS")
    return titles


def parse_port(text: str | int) -> int:
    try:
        port = int(text)
    except ValueError:
        raise NodeError(f"port '{text}' is not a number; pass 1 to {MAX_PORT}, e.g. 11112") from None
    if not 1 <= port <= MAX_PORT:
        raise NodeError(f"port {port} is out of range; pass 1 to {MAX_PORT}, e.g. 11112")
    return port


def parse_destination(text: str) -> Destination:
    """``AE@HOST:PORT`` (``AE@[::1]:104`` for an IPv6 address) -> ``Destination``."""
    example = "e.g. ORTHANC@pacs.example.org:4242"
    ae_title, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host:
        raise NodeError(f"destination '{text}' is not AE@HOST:PORT ({example})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Destination(parse_ae_title(ae_title, f"destination '{text}': AE title"), host, parse_port(port))


def parse_stow_url(text: str) -> str:
    """A DICOMweb base URL (http or https) for STOW-RS."""
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise NodeError(f"STOW-RS URL '{text}' is not an http(s) URL; pass the DICOMweb root, "
                        "e.g. http://pacs.example.org:8042/dicom-web")
    return text.rstrip("/")


def check_tls(cert: Path | None, key: Path | None, ca: Path | None) -> TlsFiles | None:
    """The TLS files, or None when none is given; a certificate needs its key and the reverse."""
    if cert is None and key is None:
        if ca is not None:
            raise NodeError("--tls-ca needs --tls-cert and --tls-key (the node's own certificate and key)")
        return None
    if cert is None or key is None:
        raise NodeError("TLS needs both --tls-cert and --tls-key (PEM files of the node's certificate and key)")
    for path in (cert, key, ca):
        if path is not None and not path.is_file():
            raise NodeError(f"TLS file not found: {path}")
    return TlsFiles(cert=cert, key=key, ca=ca)


def parse_size(text: str) -> int:
    """``100GiB``, ``8G``, ``512MB``, ``4096`` (bytes) -> bytes (``config.parse_byte_size``); at least one byte."""
    count = parse_byte_size(text)
    if count is None:
        raise NodeError(f"size '{text}' is not a size in {SIZE_EXAMPLES}")
    if count < 1:
        raise NodeError(f"size '{text}' is zero; pass at least one byte, e.g. 1GiB")
    return count


def format_size(count: int) -> str:
    """The shortest exact form of a byte count in binary units: ``1GiB``, ``100GiB``, ``1536KiB``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = SIZE_UNITS[unit.lower()]
        if count % size == 0:
            return f"{count // size}{unit}"
    return f"{count}B"


def parse_host_list(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``10.1.2.3,192.168.0.0/24,::1`` -> networks (an address is a network of one)."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise NodeError(f"'{part}' is not an IP address or network; pass addresses or networks such as "
                            "10.1.2.3,192.168.0.0/24 (host names are not accepted: they are not checked at accept)") \
                from None
    if not networks:
        raise NodeError(f"'{text}' names no address; pass a comma-separated list such as 10.1.2.3,192.168.0.0/24")
    return tuple(networks)


def check_connection_limit(max_connections: int | None, max_associations: int) -> int | None:
    """``--max-connections`` must leave room for ``--max-associations`` (else that limit never applies)."""
    if max_connections is not None and max_connections < max_associations:
        raise NodeError(f"--max-connections {max_connections} is below --max-associations {max_associations}: "
                        "every association needs a connection; raise --max-connections or lower --max-associations")
    return max_connections
