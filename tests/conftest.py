"""Shared fixtures: pools of ranks (real gloo groups on loopback), one per tp and
transport, created on first use and torn down at the end of the session."""

from __future__ import annotations

from typing import Callable

import pytest

from flashcomm.tools.testing import RankPool, RankPools

# Every multi-rank test runs on both transports: host shared memory and the c10d
# ProcessGroup (gloo) itself.
TRANSPORTS = ["shm", "c10d"]


@pytest.fixture(scope="session")
def rank_pools():
    pools = RankPools()
    try:
        yield pools
    finally:
        pools.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    """The transport this test's rank pools use (FLASHCOMM_TRANSPORT in the ranks)."""
    return request.param


@pytest.fixture
def ranks(rank_pools, transport) -> Callable[[int], RankPool]:
    """``ranks(tp)`` -> a RankPool of tp processes in one gloo group whose flashcomm
    groups use ``transport``."""
    return lambda tp: rank_pools(tp, env={"FLASHCOMM_TRANSPORT": transport})
