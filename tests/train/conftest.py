"""Fixtures for trainer tests: synthetic Stillinger-Weber relaxation pairs (see tests/swdata.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swdata import make_sw_pairs  # noqa: E402


@pytest.fixture(scope="session")
def sw_pairs():
    return make_sw_pairs(6, with_trajectory=True)
