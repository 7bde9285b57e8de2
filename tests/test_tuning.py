"""Tuning tables (flashcomm.tuning): round trip, atomic write, rejection of corrupt or
foreign tables (warning + defaults), and apply_table steering the auto strategy on a
real 2-rank gloo group (asserted through flashcomm.stats()). No timings."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

import flashcomm
from flashcomm import _atomic_write, tuning
from flashcomm.tools.bench.metrics import crossover
from flashcomm.tools.bench.tune import model_op_shapes
from flashcomm.tools.models import TINY
from flashcomm.tuning import (NEVER, TuningEntry, TuningTable, TuningTableWarning, apply_table,
                              load_and_apply, load_table, save_table, table_fingerprint,
                              table_from_json, table_to_json)

K_R, N = 32, 24  # gemm_rs per-rank shape used on the rank pool


def _table(**kw) -> TuningTable:
    entries = kw.pop("entries", [
        TuningEntry("gemm_rs", 128, 256, 2, "float32", 512),
        TuningEntry("ag_gemm_w8a8", 256, 128, 2, "int8", NEVER),
        TuningEntry("ag_gemm", 256, 128, 2, "bfloat16", 0),
    ])
    return TuningTable(entries=entries, sp_threshold=kw.pop("sp_threshold", 2048),
                       pipeline_config=(4, 16), machine={"cpu": "test"},
                       measurements=[{"op": "gemm_rs", "tokens": [1, 2]}], created="now", **kw)


def test_round_trip_keeps_content_and_hash(tmp_path):
    t = _table()
    path = tmp_path / "t.json"
    digest = save_table(t, str(path))
    assert digest == table_fingerprint(t)
    back = load_table(str(path))
    assert sorted(back.entries, key=TuningEntry.key) == sorted(t.entries, key=TuningEntry.key)
    assert back.sp_threshold == 2048
    assert back.pipeline_config == (4, 16) and back.machine == {"cpu": "test"}
    assert table_fingerprint(back) == digest and back.source == str(path)
    data = json.loads(path.read_text())
    assert data["format"] == tuning.TABLE_FORMAT and data["version"] == tuning.TABLE_VERSION
    assert data["content_hash"] == digest


def test_fingerprint_is_order_independent_and_ignores_descriptions():
    t = _table()
    u = _table(entries=list(reversed(t.entries)))
    u.machine, u.measurements, u.created = {"cpu": "other"}, [], "later"
    assert table_fingerprint(t) == table_fingerprint(u)
    v = _table(entries=[TuningEntry("gemm_rs", 128, 256, 2, "float32", 513)] + t.entries[1:])
    assert table_fingerprint(v) != table_fingerprint(t)
    assert table_fingerprint(_table(sp_threshold=None)) != table_fingerprint(t)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    save_table(_table(), str(path))
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(_atomic_write.os, "replace", boom)
    with pytest.raises(OSError):
        save_table(_table(sp_threshold=1), str(path))
    assert path.read_bytes() == before  # the old table survives intact
    assert os.listdir(tmp_path) == ["t.json"]  # the temporary file is removed


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(version=tuning.TABLE_VERSION + 1),
    lambda d: d.update(format="someone-else"),
    lambda d: d["entries"][0].update(threshold=7),  # hash no longer matches
    lambda d: d["entries"][0].update(op="gemm_ar"),
    lambda d: d["entries"][0].update(threshold=-3),
    lambda d: d.update(entries="nope"),
    lambda d: d.update(pipeline_config=[0, 16]),
    lambda d: d["entries"].append(dict(d["entries"][0])),  # duplicate key
], ids=["version", "format", "hash", "op", "negative", "entries", "pipeline", "duplicate"])
def test_bad_table_warns_and_gives_defaults(tmp_path, mutate):
    data = table_to_json(_table())
    mutate(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.warns(TuningTableWarning, match="ignoring tuning table"):
        t = load_table(str(path))
    assert t.entries == [] and t.sp_threshold is None and t.source == "defaults"


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"format": "flashcomm-tuning"'])
def test_corrupt_file_warns_and_gives_defaults(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.warns(TuningTableWarning):
        assert load_table(str(path)).entries == []


def test_missing_file_warns_and_gives_defaults(tmp_path):
    with pytest.warns(TuningTableWarning):
        assert load_table(str(tmp_path / "absent.json")).entries == []


def test_table_from_json_raises_on_bad_input():
    with pytest.raises(ValueError):
        table_from_json({"format": tuning.TABLE_FORMAT, "version": 99, "entries": []})


def test_crossover_rule():
    ns = [64, 128, 256, 512, 1024]
    assert crossover(ns, [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]) == NEVER
    assert crossover(ns, [1, 1, 1, 1, 1], [0.5] * 5) == 0
    assert crossover(ns, [1, 1, 1, 1, 1], [2, 2, 0.5, 0.5, 0.5]) == 128
    # a win below a later loss does not count: pipelined must win at every larger n
    assert crossover(ns, [1, 1, 1, 1, 1], [0.5, 2, 0.5, 2, 0.5]) == 512
    assert crossover(ns, [1, 1, 1, 1, 1], [0.97] * 5, margin=0.05) == NEVER


def test_model_op_shapes_use_per_rank_keys():
    shapes = model_op_shapes(TINY, 2, "float32", False)
    got = {(layer, op, k, n, dt) for layer, op, k, n, dt in shapes}
    H, inter, D = TINY.hidden_size, TINY.intermediate_size, TINY.head_dim
    q_out = (TINY.num_heads + 2 * TINY.num_kv_heads) * D
    assert ("qkv", "ag_gemm", H, q_out // 2, "float32") in got
    assert ("gate_up", "ag_gemm", H, inter, "float32") in got
    assert ("down", "gemm_rs", inter // 2, H, "float32") in got
    w8 = model_op_shapes(TINY, 2, "float32", True)
    assert {s[1] for s in w8} == {"ag_gemm_w8a8", "gemm_rs_w8a8"} and {s[4] for s in w8} == {"int8"}


# --- apply_table on a real 2-rank group --------------------------------------------

def _auto_strategy_on_rank(table_json, n: int) -> dict:
    """Applies the table (or clears it), runs gemm_rs with threshold=-1 and returns the
    strategy counters; always leaves the C++ table empty for the next test."""
    try:
        if table_json is None:
            torch.ops.flashcomm.clear_auto_thresholds()
        else:
            apply_table(table_from_json(table_json))
        g = torch.Generator().manual_seed(dist.get_rank())
        x = torch.randn(n, K_R, generator=g)
        w = torch.randn(N, K_R, generator=g)
        flashcomm.reset_stats()
        flashcomm.gemm_rs(x, w, None, None, -1, True)
        return flashcomm.stats()["gemm_rs"]
    finally:
        torch.ops.flashcomm.clear_auto_thresholds()


def _load_and_apply_on_rank(path: str, n: int) -> tuple[str, dict]:
    try:
        t = load_and_apply(path)
        x = torch.randn(n, K_R)
        w = torch.randn(N, K_R)
        flashcomm.reset_stats()
        flashcomm.gemm_rs(x, w, None, None, -1, True)
        return table_fingerprint(t), flashcomm.stats()["gemm_rs"]
    finally:
        torch.ops.flashcomm.clear_auto_thresholds()


def _ran(counts: dict) -> str:
    assert sum(counts.values()) == 1, counts
    return next(k for k, v in counts.items() if v)


def test_apply_table_changes_the_auto_strategy(ranks):
    pool = ranks(2)
    low = table_to_json(TuningTable(entries=[TuningEntry("gemm_rs", K_R, N, 2, "float32", 8)]))
    high = table_to_json(TuningTable(entries=[TuningEntry("gemm_rs", K_R, N, 2, "float32", NEVER)]))
    other = table_to_json(TuningTable(entries=[TuningEntry("gemm_rs", K_R + 1, N, 2, "float32",
                                                            8)]))
    # n = 40: default threshold 1000 -> sequential; table says 8 -> pipelined
    assert {_ran(c) for c in pool.run(_auto_strategy_on_rank, None, 40)} == {"sequential"}
    assert {_ran(c) for c in pool.run(_auto_strategy_on_rank, low, 40)} == {"pipelined"}
    # an entry for another shape does not apply
    assert {_ran(c) for c in pool.run(_auto_strategy_on_rank, other, 40)} == {"sequential"}
    # n = 1500: default -> pipelined; "never" -> sequential
    assert {_ran(c) for c in pool.run(_auto_strategy_on_rank, None, 1500)} == {"pipelined"}
    assert {_ran(c) for c in pool.run(_auto_strategy_on_rank, high, 1500)} == {"sequential"}


def test_load_and_apply_on_every_rank(ranks, tmp_path):
    pool = ranks(2)
    good = tmp_path / "good.json"
    save_table(TuningTable(entries=[TuningEntry("gemm_rs", K_R, N, 2, "float32", 8)]), str(good))
    results = pool.run(_load_and_apply_on_rank, str(good), 40)
    assert len({fp for fp, _ in results}) == 1  # every rank holds the same table
    assert {_ran(c) for _, c in results} == {"pipelined"}
    bad = tmp_path / "bad.json"
    bad.write_text("{corrupt")
    results = pool.run(_load_and_apply_on_rank, str(bad), 40)  # warning on each rank, defaults
    assert results[0][0] == table_fingerprint(tuning.default_table())
    assert {_ran(c) for _, c in results} == {"sequential"}
