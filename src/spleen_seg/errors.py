"""Project error types.

Every error a user can cause (bad file, bad flag, bad config value) is raised as a
``SpleenSegError`` whose message names the file or value, what was expected and how
to fix it. The CLI turns these into a one-line message and exit status 2.
"""

from __future__ import annotations


def format_bytes(count: float) -> str:
    """A byte count for a message: ``1.2 GB``, ``340 MB``, ``512 bytes`` (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def library_message(err: BaseException, max_chars: int | None = 200) -> str:
    """The first line of a library exception's message (at most ``max_chars``), for our own one-line errors.

    Why: some libraries put a traceback in the message itself (pydicom's ``tag_in_exception``:
    ``"With tag (0010,0030) got exception: ...\nTraceback (most recent call last): ..."``);
    the first line is the gist, the rest would break the one-line error and notice lines.
    """
    first = (str(err).splitlines() or [""])[0]
    return first if max_chars is None else first[:max_chars]


class SpleenSegError(ValueError):
    """Base class for errors caused by user input."""


class InputImageError(SpleenSegError):
    """An input image is missing, unreadable or unusable (2D, NaNs, constant)."""


class ConfigError(SpleenSegError):
    """A configuration value or command-line flag is invalid."""


class DatasetError(SpleenSegError):
    """A dataset folder does not follow the expected layout."""


class DownloadError(SpleenSegError):
    """A download failed, was cut short or did not match its checksum."""


class WeightsError(SpleenSegError):
    """A weights file is missing, unreadable or does not fit the network."""


class NodeError(SpleenSegError):
    """The DICOM node cannot start or run as asked (port in use, spool locked, bad destination)."""


class ResourceError(SpleenSegError):
    """A case needs more memory than is free; the message names what it needs and what is free."""


class ForeignOutputError(ConfigError):
    """An output path holds something spleen-seg did not write, or a review: it is left as it was."""
