"""Shared fixtures: pools of ranks (real gloo groups on loopback), one per tp,
created on first use and torn down at the end of the session."""

from __future__ import annotations

import pytest

from flashcomm.testing import RankPool


class Pools:
    """Lazily created RankPools keyed by world size; a broken pool is replaced."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, tp: int) -> RankPool:
        pool = self._pools.get(tp)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            pool = RankPool(tp, timeout_s=120.0)
            self._pools[tp] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


@pytest.fixture(scope="session")
def ranks():
    """``ranks(tp)`` -> a RankPool of tp processes in one gloo group."""
    pools = Pools()
    try:
        yield pools
    finally:
        pools.close()
