"""What a batch may replace or remove: only what spleen-seg wrote and recognises as its own.

``-o`` may name a folder that already holds someone's data: the data folder itself (a
manifest whose case ids are the patients' folders), or a folder of theirs that happens to
bear a case's name. A batch replaces a case's folder when the case finishes, removes it when
the case fails, removes the work folders of killed runs and rewrites its run-level files;
each of these first recognises what it replaces or removes:

* **Case folders** and the hidden work folders beside them (``.<case>.partial-<pid>``,
  ``.<case>.old-<pid>``): a real folder (not a link) holding :data:`MARKER_FILENAME`, which
  :func:`new_work_folder` writes first into every work folder and the rename to ``<case>``
  carries along. A case folder of an earlier version (written before the marker) is
  recognised by what resume already requires of it: a readable ``report.json`` whose
  outputs are all there (``complete_report``). A work folder holding nothing
  else than, at most, the marker is removable too: nothing is lost.
* **A review** (``report.json``'s ``review`` record, or the corrected mask beside the model's,
  see ``outputs.review_state``) is never replaced or removed, whoever wrote the folder: a
  reviewer's work has no other copy. Resume still skips such a case when nothing changed.
* **Run-level files** (``summary.csv``, ``index.html``, ``run_info.json``, the part summaries,
  journals and ``.done`` marks): each writer says how its file is recognised from its first
  bytes (a header row, the page's first lines, the JSON's first key), and :func:`check_file`
  refuses the rest.

What is not recognised is left byte for byte as it was, with one line naming it
(``ForeignOutputError``): the case fails and the others go on, or, for a run-level file, the
run is refused before any model loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from spleen_seg.errors import ForeignOutputError
from spleen_seg.outputs.review_state import CORRECTED_MASK_FILENAME, CORRECTED_SEG_FILENAME, REVIEW_KEY

if TYPE_CHECKING:
    from spleen_seg.outputs.report import CaseReport

logger = logging.getLogger(__name__)

MARKER_FILENAME = ".spleen-seg"
WRITTEN_BY = "spleen-seg"
MARKER_TEXT = json.dumps({"written_by": WRITTEN_BY, "what": "a case folder of spleen-seg segment: a later run "
                          "may replace it (the case finished) or remove it (the case failed)"}) + "\n"
# A marker is about a hundred bytes and a report a few kB: what is far larger is not ours
# (and is not read whole to find out).
MAX_MARKER_BYTES = 4096
MAX_REPORT_BYTES = 16 * 2**20
# Run-level files are recognised from this many first bytes.
FILE_HEAD_BYTES = 4096
HOW_TO_PROCEED = "it is left as it is: move it away, or choose another output folder (-o)"


def complete_report(case_dir: Path) -> tuple[CaseReport | None, str]:
    """The case's report when its folder holds it and every output it lists, else (None, why)."""
    from spleen_seg.outputs.report import REPORT_FILENAME, read_report

    if not case_dir.is_dir():
        return None, "not computed yet"
    report = read_report(case_dir / REPORT_FILENAME)
    if report is None:
        return None, f"no readable {REPORT_FILENAME}"
    # Outputs are recorded with the folder's path at the time: look them up by name, so
    # that a moved output folder still resumes.
    missing = [name for name, path in report.outputs.items() if not (case_dir / Path(path).name).is_file()]
    if not report.outputs or missing:
        return None, f"outputs missing ({', '.join(missing) or 'none listed'})"
    return report, ""


def new_work_folder(folder: Path) -> None:
    """Create the hidden work folder ``folder`` with the marker in it, first removing one of ours
    left there (a killed run whose process id came back). Raises ``ForeignOutputError`` when
    something else is there."""
    if os.path.lexists(folder):
        remove_folder(folder, strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)  # segment_one may be the first to write into -o
    folder.mkdir()
    # One write of a short text: a kill leaves the marker whole or empty, never half of it.
    (folder / MARKER_FILENAME).write_text(MARKER_TEXT, encoding="utf-8")


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` must not be replaced or removed, or None: absent, or spleen-seg's own without a review."""
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink():
        return f"output folder {folder} is a symbolic link, not a folder spleen-seg wrote; {HOW_TO_PROCEED}"
    if not folder.is_dir():
        return f"{folder} exists where the case's output folder goes and is not a folder; {HOW_TO_PROCEED}"
    review = review_held(folder)
    if review is not None:
        return (f"output folder {folder} holds a review ({review}); a batch never replaces or removes a review: "
                "write to another output folder (-o), or move the review away to compute this case again")
    if _has_marker(folder) or _earlier_case_folder(folder):
        return None
    return f"output folder {folder} exists and was not written by spleen-seg; {HOW_TO_PROCEED}"


def check_folder(folder: Path) -> None:
    """Raise ``ForeignOutputError`` unless ``folder`` may be replaced (see :func:`folder_problem`)."""
    problem = folder_problem(folder)
    if problem is not None:
        raise ForeignOutputError(problem)


def remove_folder(folder: Path, *, strict: bool = False, work: bool = False) -> str | None:
    """Remove ``folder`` when it is spleen-seg's own and holds no review; return why it was kept, or None.

    ``work``: a hidden work folder, also removed when it holds nothing but (at most) the marker.
    ``strict``: raise ``ForeignOutputError`` instead of returning the reason.
    """
    problem = folder_problem(folder)
    if problem is not None and work and _holds_at_most_a_marker(folder):
        problem = None
    if problem is not None:
        if strict:
            raise ForeignOutputError(problem)
        return problem
    shutil.rmtree(folder, ignore_errors=True)
    return None


def review_held(folder: Path) -> str | None:
    """What review ``folder`` holds (its report's review record, the corrected mask...), or None."""
    from spleen_seg.outputs.report import REPORT_FILENAME

    held = [name for name in (CORRECTED_MASK_FILENAME, CORRECTED_SEG_FILENAME) if os.path.lexists(folder / name)]
    report = _json_object(folder / REPORT_FILENAME, MAX_REPORT_BYTES)
    if report is not None and report.get(REVIEW_KEY) is not None:
        held.insert(0, f"a review record in {REPORT_FILENAME}")
    return ", ".join(held) or None


def check_file(path: Path, recognised: Callable[[bytes], bool], what: str) -> None:
    """Raise ``ForeignOutputError`` unless ``path`` is absent or a file (not a link) whose first
    :data:`FILE_HEAD_BYTES` bytes ``recognised`` accepts; ``what`` names the file kind expected."""
    if not os.path.lexists(path):
        return
    head = None
    if not path.is_symlink() and path.is_file():
        try:
            with path.open("rb") as file:
                head = file.read(FILE_HEAD_BYTES)
        except OSError:
            head = None
    if head is None or not recognised(head):
        raise ForeignOutputError(f"{path} exists and is not {what} spleen-seg wrote; {HOW_TO_PROCEED}")


def _json_object(path: Path, max_bytes: int) -> dict | None:
    """The JSON object in ``path`` (a file, not a link, at most ``max_bytes``), or None."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > max_bytes:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_marker(folder: Path) -> bool:
    marker = _json_object(folder / MARKER_FILENAME, MAX_MARKER_BYTES)
    return marker is not None and marker.get("written_by") == WRITTEN_BY


def _earlier_case_folder(folder: Path) -> bool:
    """A case folder written before the marker: its report readable and every output it lists there."""
    from spleen_seg.outputs.report import REPORT_FILENAME

    report = folder / REPORT_FILENAME
    try:
        if report.is_symlink() or report.stat().st_size > MAX_REPORT_BYTES:
            return False
    except OSError:
        return False
    return complete_report(folder)[0] is not None


def _holds_at_most_a_marker(folder: Path) -> bool:
    """A work folder a kill interrupted as it was created: empty, or holding only an empty marker."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        entries = list(folder.iterdir())
        return not entries or (len(entries) == 1 and entries[0].name == MARKER_FILENAME
                               and not entries[0].is_symlink() and entries[0].stat().st_size == 0)
    except OSError:
        return False
