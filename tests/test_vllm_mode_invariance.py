"""Numerics across the threshold in vLLM (README): the same requests served with
sp_threshold 0 (every forward sharded) and with a threshold above every batch (every
forward replicated) give bitwise the same greedy ids and top-5 log-probs, in float32 and
bfloat16 (Qwen3) and W8A8 (Qwen3, dynamic per-token, served in bf16). tp = 2 on the CPU,
shared-memory transport, default settings (no FLASHCOMM_BITWISE_MODES needed on shm).

One engine per configuration serves both: vLLM runs the model uncompiled (compilation
mode NONE, so a converted layer reads its threshold at every forward) and every worker
switches its threshold between the two passes (``run_engine(switch_thresholds=...)``:
the same process, weights and KV-cache layout; the counters show each pass in one mode).

Mixed batches: a long prompt with two short ones (:data:`MIXED`) against each request
alone. flashcomm's own ops are batch-invariant on shm (each row is summed in rank
order and normalised on its own), vLLM's GEMMs and attention may not be: where the
batched and the lone run differ with flashcomm on, the same pair with flashcomm off
must differ there too (the difference is vLLM's), and where off shows none, on must
show none.

Each engine start takes 35-160 s on a 2-core machine: 3 engines, plus one flashcomm-off
engine per configuration where the batched and the lone run differ with flashcomm on
(none did on the machine that wrote this)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _vllm_cases import CPU_VIEW, requires_vllm
from flashcomm.tools.vllm_engine import MIXED, make_checkpoint, run_engine

pytestmark = requires_vllm

ALWAYS_REPLICATED = 1 << 30


def _serve(tmp: Path, model: Path, dtype: str, enable: bool = True) -> dict:
    switch = (0, ALWAYS_REPLICATED) if enable else (ALWAYS_REPLICATED,)
    res, log = run_engine(tmp, model, enable=enable, dtype=dtype, cpu_view=CPU_VIEW,
                          switch_thresholds=switch, tag=f"_{dtype}")
    assert res is not None, (f"vLLM ({model.name}, {dtype}, flashcomm "
                             f"{'on' if enable else 'off'}) failed:\n{log[-6000:]}")
    print(f"\n{model.name} {dtype} flashcomm {'on' if enable else 'off'}: {res['wall_s']} s",
          file=sys.stderr)
    return res


def _modes_counted(phase: dict) -> set[str]:
    """The layout modes flashcomm's ops ran in during one pass, over every worker and op."""
    return {mode for w in phase["workers_after"] for counts in w["stats"].values()
            for mode, calls in counts.items() if calls and mode in ("replicated", "sharded")}


def _differing(inv: dict) -> set[tuple[int, int]]:
    """(request, position) where the batched run and the lone run differ in the greedy
    id or in any top-5 log-prob."""
    out = set()
    for i in range(len(MIXED)):
        a_ids, b_ids = inv["ids_mixed"][i], inv["ids_alone"][i]
        a_lp, b_lp = inv["logprobs_mixed"][i], inv["logprobs_alone"][i]
        for pos in range(max(len(a_ids), len(b_ids))):
            if (a_ids[pos:pos + 1] != b_ids[pos:pos + 1]
                    or a_lp[pos:pos + 1] != b_lp[pos:pos + 1]):
                out.add((i, pos))
    return out


_PER_PASS = ("workers_after", "converted_switched")


def _check(tmp: Path, model: Path, dtype: str) -> None:
    res = _serve(tmp, model, dtype)
    sharded, replicated = res["switched"]["0"], res["switched"][str(ALWAYS_REPLICATED)]
    assert _modes_counted(sharded) == {"sharded"}, sharded["workers_after"]
    assert _modes_counted(replicated) == {"replicated"}, replicated["workers_after"]
    assert all(n > 0 for n in sharded["converted_switched"]), sharded["converted_switched"]
    assert {w["transport"] for w in sharded["workers_after"]} == {"shm"}
    # BIG / SMALL and MIXED (batched and alone): ids and top-5 log-probs, bitwise.
    same = {k: v for k, v in sharded.items() if k not in _PER_PASS}
    other = {k: v for k, v in replicated.items() if k not in _PER_PASS}
    assert set(same) == set(other)
    for key in sorted(same):
        assert same[key] == other[key], (f"{key}: sharded and replicated forwards differ:\n"
                                         f"sharded {same[key]}\nreplicated {other[key]}")
    # Mixed batch vs alone: flashcomm adds no batch dependence of its own.
    on = _differing(sharded)
    if on:
        off = _differing(_serve(tmp, model, dtype, enable=False)["switched"][
            str(ALWAYS_REPLICATED)])
        assert on <= off, (f"batched vs alone differ with flashcomm on at {sorted(on - off)}"
                           f" where vLLM alone does not (off differs at {sorted(off)})")


def test_qwen3_fp32_sharded_equals_replicated(tmp_path):
    _check(tmp_path, make_checkpoint(tmp_path, "qwen3", "--arch", "qwen3"), "float32")


def test_qwen3_bf16_sharded_equals_replicated(tmp_path):
    _check(tmp_path, make_checkpoint(tmp_path, "qwen3", "--arch", "qwen3"), "bfloat16")


def test_qwen3_w8a8_bf16_sharded_equals_replicated(tmp_path):
    model = make_checkpoint(tmp_path, "qwen3-w8a8", "--arch", "qwen3", "--w8a8", "--act",
                            "dynamic")
    _check(tmp_path, model, "bfloat16")
