"""Numerics across the threshold in vLLM (README): the same requests served with
``FLASHCOMM_SP_THRESHOLD=0`` (every forward sharded) and with a threshold above every
batch (every forward replicated) give bitwise the same greedy ids and top-5 log-probs,
in float32 and bfloat16 (Qwen3) and W8A8 (Qwen3, dynamic per-token, served in bf16).
tp = 2 on the CPU, shared-memory transport, the eager compile backend, default
settings (no FLASHCOMM_BITWISE_MODES needed on shm).

Mixed batches: a long prompt with two short ones (:data:`MIXED`) against each request
alone. flashcomm's own ops are batch-invariant on shm (each row is summed in rank
order and normalised on its own), vLLM's GEMMs and attention may not be: where the
batched and the lone run differ with flashcomm on, the same pair with flashcomm off
must differ there too (the difference is vLLM's), and where off shows none, on must
show none.

Each engine start takes 35-160 s on a 2-core machine: 6 engines (7 min at a load
average of 5-8), plus one flashcomm-off engine per configuration where the batched and
the lone run differ with flashcomm on (none did on the machine that wrote this)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _vllm_cases import CPU_VIEW, requires_vllm
from flashcomm.tools.vllm_engine import MIXED, make_checkpoint, run_engine

pytestmark = requires_vllm

ALWAYS_REPLICATED = 1 << 30


def _serve(tmp: Path, model: Path, dtype: str, sp_threshold: int, enable: bool = True) -> dict:
    res, log = run_engine(tmp, model, enable=enable, dtype=dtype, invariance=True,
                          cpu_view=CPU_VIEW, env={"FLASHCOMM_SP_THRESHOLD": str(sp_threshold)},
                          tag=f"_{dtype}_{sp_threshold}")
    assert res is not None, (f"vLLM ({model.name}, {dtype}, flashcomm "
                             f"{'on' if enable else 'off'}, sp_threshold {sp_threshold}) "
                             f"failed:\n{log[-6000:]}")
    print(f"\n{model.name} {dtype} flashcomm {'on' if enable else 'off'} sp_threshold "
          f"{sp_threshold}: {res['wall_s']} s", file=sys.stderr)
    return res


def _modes_counted(res: dict) -> set[str]:
    """The layout modes flashcomm's ops ran in, over every worker and op."""
    return {mode for w in res["workers_after"] for counts in w["stats"].values()
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


def _check(tmp: Path, model: Path, dtype: str) -> None:
    sharded = _serve(tmp, model, dtype, 0)
    replicated = _serve(tmp, model, dtype, ALWAYS_REPLICATED)
    assert _modes_counted(sharded) == {"sharded"}, sharded["workers_after"]
    assert _modes_counted(replicated) == {"replicated"}, replicated["workers_after"]
    assert {w["transport"] for w in sharded["workers_after"]} == {"shm"}
    # The checked pass (36- and 8-token prefills, decode steps) and the invariance pass.
    for key in ("ids_big", "ids_small"):
        assert sharded[key] == replicated[key], (key, sharded[key], replicated[key])
    assert sharded["invariance"] == replicated["invariance"], (
        "sharded and replicated forwards differ:\n"
        f"sharded {sharded['invariance']}\nreplicated {replicated['invariance']}")
    # Mixed batch vs alone: flashcomm adds no batch dependence of its own.
    on = _differing(sharded["invariance"])
    if on:
        off = _differing(_serve(tmp, model, dtype, 0, enable=False)["invariance"])
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
