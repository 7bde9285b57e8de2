"""The policy and shard arithmetic the library exposes to Python (one source of each
rule: csrc/core; the tests and tools ask the library instead of restating it)."""

from __future__ import annotations

import pytest
import torch

import flashcomm
from flashcomm.ops import DEFAULTS

ops = torch.ops.flashcomm


def test_defaults_and_version():
    assert flashcomm.DEFAULT_THRESHOLD == DEFAULTS["threshold"] > 0
    assert flashcomm.DEFAULT_SP_THRESHOLD == DEFAULTS["sp_threshold"] > 0
    assert flashcomm.get_pipeline_config() == (DEFAULTS["max_chunks"], DEFAULTS["min_chunk_rows"])
    schema = str(ops.gemm_rs.default._schema)
    assert f"int threshold={DEFAULTS['threshold']}" in schema, schema
    assert f"int sp_threshold={DEFAULTS['sp_threshold']}" in str(ops.sp_reduce.default._schema)
    assert flashcomm.__version__.count(".") == 2


@pytest.mark.parametrize("n,tp,sp_threshold,enabled,mode", [
    (1001, 2, 1000, True, "sharded"), (1000, 2, 1000, True, "replicated"),  # strict >
    (5000, 1, 1000, True, "replicated"), (5000, 4, 1000, False, "replicated"),
    (1, 2, 0, True, "sharded")])
def test_mode_rule(n, tp, sp_threshold, enabled, mode):
    assert flashcomm.sp_mode(n, tp, sp_threshold, enabled) == mode


@pytest.mark.parametrize("n,tp,threshold,enabled,strategy", [
    (1001, 2, 1000, True, "pipelined"), (1000, 2, 1000, True, "sequential"),
    (5000, 1, 1000, True, "sequential"), (5000, 2, 1000, False, "sequential")])
def test_strategy_rule(n, tp, threshold, enabled, strategy):
    assert ops.strategy(n, tp, threshold, enabled) == strategy


def test_auto_threshold_resolution():
    ops.clear_auto_thresholds()
    try:
        assert ops.resolve_threshold("gemm_rs", 64, 32, 2, "float32", 7) == 7
        assert ops.resolve_threshold("gemm_rs", 64, 32, 2, "float32", -1) == DEFAULTS["threshold"]
        ops.set_auto_threshold("gemm_rs", 64, 32, 2, "float32", 123)
        assert ops.resolve_threshold("gemm_rs", 64, 32, 2, "float32", -1) == 123
        assert ops.resolve_threshold("gemm_rs", 64, 32, 4, "float32", -1) == DEFAULTS["threshold"]
    finally:
        ops.clear_auto_thresholds()


def test_shard_arithmetic():
    assert ops.shard_rows(10, 4) == 3
    assert [flashcomm.owned_rows(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9),
                                                                  (9, 10)]
    assert flashcomm.owned_rows(5, 4, 3) == (5, 5)  # a rank whose block is all padding
    assert list(ops.plan_chunks(100, 4, 16)) == [0, 25, 25, 50, 50, 75, 75, 100]
    assert list(ops.plan_chunks(20, 4, 16)) == [0, 20]  # never below min_chunk_rows


@pytest.mark.parametrize("call,message", [
    (lambda: ops.owned_rows(4, 2, 2), "owned_rows: rank must be in"),
    (lambda: ops.sp_mode(-1, 2, 0), "sp_mode: n must be >= 0"),
    (lambda: ops.strategy(4, 2, -1), "strategy: threshold must be resolved"),
    (lambda: ops.plan_chunks(4, 0, 1), "plan_chunks: need c >= 0, max_chunks >= 1")])
def test_bad_arguments(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
