"""Rank agreement and timeouts: a rank that would take a different collective
path, or never joins, makes every rank fail fast with a clear error, not hang.
Each test uses its own fresh group (agreement runs at a group's first use)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.testing import RankPool

from _cases import error_of
from conftest import TRANSPORTS


def _first_use_with_rank_threshold(thresholds):
    rank = dist.get_rank()
    x, w = torch.randn(6, 8), torch.randn(4, 8)
    return error_of(flashcomm.gemm_rs, x, w, None, None, thresholds[rank])


def _first_use_after_rank_config(configs):
    flashcomm.set_pipeline_config(*configs[dist.get_rank()])
    x, w = torch.randn(6, 8), torch.randn(6, 8)
    return error_of(flashcomm.sp_column_linear, x, w, None, None, 1000)


def _first_use_after_rank_table(entries):
    """Rank r loads tuning-table entries entries[r] (as a mismatched table file would)."""
    torch.ops.flashcomm.clear_auto_thresholds()
    for op, k, n, tp, dtype, threshold in entries[dist.get_rank()]:
        torch.ops.flashcomm.set_auto_threshold(op, k, n, tp, dtype, threshold)
    try:
        x, w = torch.randn(6, 8), torch.randn(4, 8)
        return error_of(flashcomm.gemm_rs, x, w, None, None, -1)
    finally:
        torch.ops.flashcomm.clear_auto_thresholds()


def _init_with_rank_sp_threshold(values):
    return error_of(flashcomm.init, None, sp_threshold=values[dist.get_rank()], enabled=True)


def _fresh_pool(timeout_s: float = 60.0, transport: str = "auto") -> RankPool:
    return RankPool(2, timeout_s=timeout_s, threads_per_rank=1,
                    env={"FLASHCOMM_TRANSPORT": transport})


def test_different_thresholds_fail_fast_with_the_setting_named():
    pool = _fresh_pool()
    try:
        start = time.monotonic()
        messages = pool.run(_first_use_with_rank_threshold, [1000, 10])
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    for msg in messages:
        assert "gemm_rs: the ranks of group" in msg, msg
        assert "'threshold': rank 0 = 1000, rank 1 = 10" in msg, msg
        assert "'enabled'" not in msg  # only the differing settings are named
    assert elapsed < 30, f"the check took {elapsed:.1f}s: it must fail fast, not time out"


def test_different_pipeline_config_fails_at_first_use():
    pool = _fresh_pool()
    try:
        messages = pool.run(_first_use_after_rank_config, [(4, 16), (8, 16)])
    finally:
        pool.close()
    for msg in messages:
        assert "sp_column_linear: the ranks of group" in msg, msg
        assert "'pipeline max_chunks': rank 0 = 4, rank 1 = 8" in msg, msg


def test_different_tuning_tables_fail_at_first_use():
    entry = ("gemm_rs", 8, 4, 2, "float32", 5)
    pool = _fresh_pool()
    try:
        messages = pool.run(_first_use_after_rank_table, [[entry], []])
    finally:
        pool.close()
    for msg in messages:
        assert "gemm_rs: the ranks of group" in msg, msg
        assert "'tuning table (hash of its entries)': rank 0 = " in msg, msg
        assert "'threshold'" not in msg


def test_init_checks_the_declared_settings():
    pool = _fresh_pool()
    try:
        agree = pool.run(_init_with_rank_sp_threshold, [512, 512])
        disagree = pool.run(_init_with_rank_sp_threshold, [512, 4096])
    finally:
        pool.close()
    assert agree == ["<no error>", "<no error>"]
    for msg in disagree:
        assert "flashcomm.init: the ranks of group" in msg, msg
        assert "'sp_threshold': rank 0 = 512, rank 1 = 4096" in msg, msg


def _one_rank_skips(n: int):
    rank = dist.get_rank()
    x, w = torch.randn(n, 8), torch.randn(4, 8)
    flashcomm.gemm_rs(x, w)  # both ranks: the group's first use (agreement) succeeds
    if rank == 1:
        return "skipped", 0.0
    start = time.monotonic()
    msg = error_of(flashcomm.gemm_rs, x, w)
    return msg, time.monotonic() - start


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [6, 2001])  # sequential, pipelined
def test_a_rank_that_never_joins_makes_the_others_fail_within_the_timeout(n, transport):
    timeout_s = 5.0
    pool = _fresh_pool(timeout_s=timeout_s, transport=transport)
    try:
        (msg, elapsed), (skipped, _) = pool.run(_one_rank_skips, n, timeout_s=120)
    finally:
        pool.close()
    assert skipped == "skipped"
    assert msg.startswith("gemm_rs: collective on group '"), msg
    assert "failed" in msg and "timeout" in msg.lower().replace("timed out", "timeout"), msg
    assert elapsed < timeout_s + 20, f"failed after {elapsed:.1f}s, group timeout {timeout_s}s"
