"""Fixtures of the node's unit tests."""

from __future__ import annotations

import pytest

from spleen_seg.node.jobs import JobTable
from spleen_seg.node.spool import Spool


@pytest.fixture
def spool_and_table(tmp_path):
    """A fresh spool under tmp_path and its job table (closed afterwards)."""
    spool = Spool(tmp_path / "spool").create()
    table = JobTable(spool.db_path)
    yield spool, table
    table.close()
