"""The reference decoder under torch.compile (fullgraph, dynamic batch dim): one
compilation for every n, logits equal to the dense single-process model and to
plain TP on both sides of sp_threshold, both layout modes observed inside the
compiled graph, and NaN-poisoned don't-care rows never reaching an output."""

from __future__ import annotations


import pytest
import torch

import flashcomm
from flashcomm.tools.models import TINY, build_model

from _cases import rank_and_size

SP_THRESHOLD = 100
# Crosses sp_threshold upwards and downwards, starting at n = 1.
TOKEN_SEQUENCE = [1, 7, 100, 101, 257, 100, 3, 1009]
# Inductor cannot lower the attention's bmm over an unbacked token dim
# (torch 2.13: _inductor/kernel/bmm.py guards on n == 1), so the inductor case
# marks the dim dynamic (backed, specialised away from 0/1) and starts at n >= 2.
INDUCTOR_TOKEN_SEQUENCE = [7, 100, 101, 257, 100, 3, 1009, 2]
# Max |logit difference| allowed against the dense model (logits are O(1..10)).
ATOL = {("float32", False): 1e-4, ("bfloat16", False): 0.25,
        ("float32", True): 0.25, ("bfloat16", True): 0.5}


def _compiled_model_on_rank(dtype_name: str, w8a8: bool, backend: str):
    from torch._dynamo.decorators import mark_unbacked
    from torch._dynamo.testing import CompileCounterWithBackend

    rank, tp = rank_and_size()
    dtype = getattr(torch, dtype_name)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kwargs = dict(w8a8=w8a8, dtype=dtype, sp_threshold=SP_THRESHOLD)
    flash = build_model(TINY, "flashcomm", **kwargs)
    plain = build_model(TINY, "tp", **kwargs)
    dense = build_model(TINY, "dense", **kwargs)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(flash, backend=counter, fullgraph=True, dynamic=True)
    rows = []
    torch.ops.flashcomm_testing.set_debug_poison(True)  # FLASHCOMM_DEBUG_POISON=1
    try:
        with torch.no_grad():
            for n in (INDUCTOR_TOKEN_SEQUENCE if backend == "inductor" else TOKEN_SEQUENCE):
                ids = torch.randint(0, TINY.vocab_size, (n,),
                                    generator=torch.Generator().manual_seed(n))
                if backend == "inductor":
                    torch._dynamo.mark_dynamic(ids, 0)
                else:
                    # The token dim is unbacked: no guard (and so no 0/1
                    # specialisation or branch on n) can enter the graph.
                    mark_unbacked(ids, 0)
                flashcomm.reset_stats()
                got = compiled(ids)
                if not rows:
                    frames_after_first_call = counter.frame_count
                modes = flashcomm.stats()["sp_add_rms_norm"]
                want_plain = plain(ids)
                want_dense = dense(ids)
                rows.append({
                    "n": n,
                    "finite": bool(torch.isfinite(got).all()),
                    "vs_dense": (got - want_dense).abs().max().item(),
                    "vs_plain": (got - want_plain).abs().max().item(),
                    "modes": modes,
                    "shape": tuple(got.shape),
                })
    finally:
        torch.ops.flashcomm_testing.set_debug_poison(False)
    recompiles = counter.frame_count - frames_after_first_call
    return torch._dynamo.utils.counters["stats"]["unique_graphs"], recompiles, rows


@pytest.mark.parametrize("dtype_name,w8a8,backend,tp", [
    ("float32", False, "inductor", 2),
    ("bfloat16", False, "aot_eager", 2),
    ("float32", True, "aot_eager", 2),
    ("float32", False, "aot_eager", 4),
    ("float32", False, "aot_eager", 1),
])
def test_compiled_model_matches_baselines(ranks, dtype_name, w8a8, backend, tp):
    results = ranks(tp).run(_compiled_model_on_rank, dtype_name, w8a8, backend, timeout_s=900)
    atol = ATOL[(dtype_name, w8a8)]
    # Norms per forward: 2 per layer + the final one, all in the same mode.
    norms = 2 * TINY.num_layers + 1
    for graphs, recompiles, rows in results:
        assert graphs == 1 and recompiles == 0, (
            f"expected one compiled graph for all n, got {graphs} graphs, {recompiles} recompiles")
        for row in rows:
            n = row["n"]
            assert row["shape"] == (n, TINY.vocab_size)
            assert row["finite"], f"non-finite logits at n={n}: a don't-care row leaked"
            assert row["vs_dense"] <= atol, row
            assert row["vs_plain"] <= atol, row
            mode = flashcomm.sp_mode(n, tp, SP_THRESHOLD)
            assert row["modes"][mode] == norms, row
    sharded = [r for r in results[0][2] if r["modes"]["sharded"]]
    assert bool(sharded) == (tp > 1)
