"""Shared fixtures: pools of ranks (real gloo groups on loopback), one per tp,
created on first use and torn down at the end of the session."""

from __future__ import annotations

import pytest

from flashcomm.testing import RankPools


@pytest.fixture(scope="session")
def ranks():
    """``ranks(tp)`` -> a RankPool of tp processes in one gloo group."""
    pools = RankPools()
    try:
        yield pools
    finally:
        pools.close()
