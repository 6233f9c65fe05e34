"""Fixtures for trainer tests: synthetic Stillinger-Weber relaxation pairs (see tests/swdata.py)."""


import pytest

from swdata import make_sw_pairs


@pytest.fixture(scope="session")
def sw_pairs():
    return make_sw_pairs(6, with_trajectory=True)
