"""Fixtures of the batch tests that run whole batches with a threshold in place of the network."""

from __future__ import annotations

import pytest
from threshold_network import install_threshold_network, sphere_batch


@pytest.fixture
def network(monkeypatch):
    """The stand-in network; ``network.loads`` counts how often a batch loaded it."""
    return install_threshold_network(monkeypatch)


@pytest.fixture
def batch(tmp_path):
    """Three sphere inputs a, b and c of different radii, fake weights, an output folder."""
    return sphere_batch(tmp_path)
