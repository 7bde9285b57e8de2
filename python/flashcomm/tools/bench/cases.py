"""What the benchmarks time, built on each rank of a :class:`~flashcomm.tools.testing.
RankPool`: per case a dict ``variant name -> (call, set-up)``; ``set-up`` (or None) runs
before every call of its variant, outside the timed region.

Every builder runs on every rank with the same arguments; shapes are per rank (``K_r``
/ ``N_r`` as the tuning table keys them, see :mod:`flashcomm.tuning`). Inputs are
seeded per rank and token count, so reruns time the same data.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import flashcomm
from flashcomm import tuning
from flashcomm.tools.reference import quantize_dynamic, quantize_weight_per_channel

Variant = tuple[Callable[[], Any], Optional[Callable[[], None]]]


class RankState:
    """Per-process state of the benchmark on one rank (module global in each worker):
    the compiled models of the model-level runs and this rank's one-rank group."""

    models: dict[str, Any] = {}
    solo_group: Optional[str] = None


def shard_rows(n: int, tp: int) -> int:
    """Rows per rank block, ``ceil(n / tp)`` (the library's shard arithmetic)."""
    return int(torch.ops.flashcomm.shard_rows(n, tp))


def plan_chunks(c: int, max_chunks: int, min_chunk_rows: int) -> list[tuple[int, int]]:
    """The ``[begin, end)`` row ranges the pipelined strategy splits a rank block of ``c``
    rows into (the library's plan)."""
    flat = [int(v) for v in torch.ops.flashcomm.plan_chunks(c, max_chunks, min_chunk_rows)]
    return list(zip(flat[0::2], flat[1::2]))


def pipeline_config_on_rank() -> tuple[int, int]:
    return flashcomm.get_pipeline_config()


def apply_table_on_rank(table_json: Optional[dict]) -> str:
    """Registers the tuning table (None: none) on this rank; returns its fingerprint
    ('' for none) so the caller can check every rank holds the same."""
    if table_json is None:
        torch.ops.flashcomm.clear_auto_thresholds()
        return ""
    table = tuning.table_from_json(table_json)
    tuning.apply_table(table)
    return tuning.table_fingerprint(table)


def auto_threshold_on_rank(op: str, k: int, n: int, dtype_key: str) -> int:
    """The threshold an op called with ``threshold < 0`` (auto) uses on this rank for
    the per-rank shape ``[K, N]`` (the tuning table's crossover, else the default)."""
    tp = dist.get_world_size()
    return int(torch.ops.flashcomm.resolve_threshold(op, k, n, tp, dtype_key, -1))


def _solo_group_name() -> str:
    """A one-rank gloo group of this rank (created once, collectively, on every rank)."""
    if RankState.solo_group is None:
        groups = [dist.new_group([r], backend="gloo") for r in range(dist.get_world_size())]
        RankState.solo_group = groups[dist.get_rank()].group_name
    return RankState.solo_group


def _set_pipeline(max_chunks: int, min_rows: int) -> Callable[[], None]:
    return lambda: flashcomm.set_pipeline_config(max_chunks, min_rows)


def build_op_case(op: str, K: int, N: int, n: int, dtype: str, variants: tuple[str, ...],
                  pipe_configs: tuple[tuple[int, int], ...] = ()) -> dict[str, Variant]:
    """One compact op at ``n`` tokens and its parts (see :mod:`flashcomm.tools.bench`
    for the variants); ``pipe@MxR`` variants run the pipelined op under pipeline config
    ``(M, R)``. Returns the requested ``variants`` that apply to ``op``."""
    tp, rank = dist.get_world_size(), dist.get_rank()
    gname = dist.group.WORLD.group_name
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1000 * rank + n)
    c = shard_rows(n, tp)
    w8 = op.endswith("w8a8")
    rs = op.startswith("gemm_rs")
    w = torch.randn(N, K, generator=g).to(dt) / K**0.5
    wq, ws = quantize_weight_per_channel(w) if w8 else (None, None)
    wqT = wq.t().contiguous() if w8 else None  # [K, N] for torch._int_mm

    def gemm(inp: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not w8:
            return torch.mm(inp, w.t(), out=out)
        q, s = quantize_dynamic(inp)
        y = (torch._int_mm(q, wqT).float() * s * ws).to(dt)
        if out is not None:
            out.copy_(y)
            return out
        return y

    V: dict[str, Variant] = {}
    # "GEMM alone" is the op itself on a one-rank group: exactly the op's own GEMM
    # (W8A8: its quantisation, int8 GEMM and dequantisation) with no collective.
    solo = _solo_group_name()
    if rs:
        x = torch.randn(n, K, generator=g).to(dt)
        send = torch.empty(tp * c, N, dtype=dt)
        if tp * c > n:
            send[n:].zero_()
        recv = torch.empty(c, N, dtype=dt)

        def py():
            s = torch.empty(tp * c, N, dtype=dt)
            gemm(x, out=s[:n])
            if tp * c > n:
                s[n:].zero_()
            out = torch.empty(c, N, dtype=dt)
            dist.reduce_scatter_tensor(out, s)
            return out

        def tp_ar():
            y = gemm(x)
            dist.all_reduce(y)
            return y

        def call(group, thr, en):
            if w8:
                return flashcomm.gemm_rs_w8a8(x, wq, ws, None, None, None, group, dt, thr, en)
            return flashcomm.gemm_rs(x, w, None, group, thr, en)

        V["gemm"] = (lambda: call(solo, tuning.NEVER, False), None)
        V["comm"] = (lambda: dist.reduce_scatter_tensor(recv, send), None)
        V["tp_ar"] = (tp_ar, None)
        V["py"] = (py, None)
    else:
        x_full = torch.randn(n, K, generator=g).to(dt)
        shard = torch.zeros(c, K, dtype=dt)
        lo, hi = flashcomm.owned_rows(n, tp, rank)
        shard[: hi - lo] = x_full[lo:hi]
        gathered = torch.empty(tp * c, K, dtype=dt)
        packed_shard = torch.zeros(c, K + 4, dtype=torch.int8)
        packed_all = torch.empty(tp * c, K + 4, dtype=torch.int8)
        bf_shard = shard.to(torch.bfloat16)
        bf_all = torch.empty(tp * c, K, dtype=torch.bfloat16)

        def py():
            if not w8:
                ga = torch.empty(tp * c, K, dtype=dt)
                dist.all_gather_into_tensor(ga, shard)
                return torch.mm(ga[:n], w.t())
            q, s = quantize_dynamic(shard)
            p = torch.cat([q, s.reshape(-1).view(torch.int8).view(-1, 4)], dim=1)
            ga = torch.empty(tp * c, K + 4, dtype=torch.int8)
            dist.all_gather_into_tensor(ga, p)
            qa = ga[:n, :K]
            sa = ga[:n, K:].contiguous().view(torch.float32)
            return (torch._int_mm(qa, wqT).float() * sa * ws).to(dt)

        def call(group, thr, en, inp=shard):
            if w8:
                return flashcomm.ag_gemm_w8a8(inp, wq, ws, None, None, None, group, n, dt, thr,
                                              en)
            return flashcomm.ag_gemm(inp, w, None, group, n, thr, en)

        if w8:
            V["comm"] = (lambda: dist.all_gather_into_tensor(packed_all, packed_shard), None)
            V["comm_bf16"] = (lambda: dist.all_gather_into_tensor(bf_all, bf_shard), None)
        else:
            V["comm"] = (lambda: dist.all_gather_into_tensor(gathered, shard), None)
        V["gemm"] = (lambda: call(solo, tuning.NEVER, False, x_full), None)
        V["py"] = (py, None)
    base = _set_pipeline(*flashcomm.get_pipeline_config())
    V["seq"] = (lambda: call(gname, tuning.NEVER, False), base)
    V["pipe"] = (lambda: call(gname, 0, True), base)
    V["auto"] = (lambda: call(gname, -1, True), base)
    for mc, mr in pipe_configs:
        V[f"pipe@{mc}x{mr}"] = (lambda: call(gname, 0, True), _set_pipeline(mc, mr))
    return {k: V[k] for k in variants if k in V}


def build_gemm_case(K: int, N: int, n: int, variants: tuple[str, ...]) -> dict[str, Variant]:
    """One local GEMM ``[n, K] x [K, N]`` in fp32, bf16, int8 (``torch._int_mm`` alone)
    and W8A8 (dynamic quantisation + int8 GEMM + dequantisation)."""
    g = torch.Generator().manual_seed(7 + n)
    x = torch.randn(n, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    xb, wb = x.bfloat16(), w.bfloat16()
    wq, ws = quantize_weight_per_channel(w)
    wqT = wq.t().contiguous()
    q, s = quantize_dynamic(x)

    def w8a8():
        qq, ss = quantize_dynamic(x)
        return torch._int_mm(qq, wqT).float() * ss * ws

    V: dict[str, Variant] = {"fp32": (lambda: torch.mm(x, w.t()), None),
                             "bf16": (lambda: torch.mm(xb, wb.t()), None),
                             "int8": (lambda: torch._int_mm(q, wqT), None),
                             "w8a8": (w8a8, None)}
    return {k: V[k] for k in variants}


def build_chunk_case(K: int, N: int, n: int, chunk_counts: tuple[int, ...], min_rows: int,
                     dtype: str) -> dict[str, Variant]:
    """One GEMM over n rows (``one``) vs the pipelined gemm_rs's GEMM calls (tp blocks x
    chunks, each writing into a slice of a send buffer), for each max_chunks
    (``chunks<M>``)."""
    tp = dist.get_world_size()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(11 + n)
    x = torch.randn(n, K, generator=g).to(dt)
    w = torch.randn(N, K, generator=g).to(dt)
    out = torch.empty(n, N, dtype=dt)
    c = shard_rows(n, tp)
    V: dict[str, Variant] = {"one": (lambda: torch.mm(x, w.t(), out=out), None)}
    for mc in chunk_counts:
        chunks = plan_chunks(c, mc, min_rows)

        def run(chunks=chunks):
            for lo, hi in chunks:
                ln = hi - lo
                send = torch.empty(tp * ln, N, dtype=dt)
                for d in range(tp):
                    a, b = min(n, d * c + lo), min(n, d * c + hi)
                    if b > a:
                        torch.mm(x[a:b], w.t(), out=send[d * ln: d * ln + (b - a)])

        V[f"chunks{mc}"] = (run, None)
    return V


BUILDERS: dict[str, Callable[..., dict[str, Variant]]] = {
    "op": build_op_case, "gemm": build_gemm_case, "chunk": build_chunk_case}


def model_setup_on_rank(model_cfg, dtype: str, w8a8: bool, variants: tuple[str, ...],
                        backend: str, table_json: Optional[dict],
                        sp_threshold: Optional[int]) -> str:
    """Compiles the reference model in each variant: ``sharded`` (flashcomm,
    sp_threshold=0), ``replicated`` (flashcomm, never sharded), ``flashcomm``
    (flashcomm with ``sp_threshold``), ``tp`` (plain TP). Kernel threshold auto."""
    from flashcomm.tools.models import build_model

    apply_table_on_rank(table_json)
    torch._dynamo.reset()
    sp = {"sharded": 0, "replicated": tuning.NEVER,
          "flashcomm": flashcomm.DEFAULT_SP_THRESHOLD if sp_threshold is None else sp_threshold}
    models = {}
    for v in variants:
        mode = "tp" if v == "tp" else "flashcomm"
        m = build_model(model_cfg, mode, w8a8=w8a8, dtype=getattr(torch, dtype),
                        sp_threshold=sp.get(v, 0), threshold=-1)
        models[v] = torch.compile(m, backend=backend, fullgraph=True, dynamic=True)
    RankState.models = models
    return f"rank {dist.get_rank()} compiled {list(models)}"


def build_model_case(n: int) -> dict[str, Variant]:
    """One forward of each model :func:`model_setup_on_rank` compiled, on ``n`` token
    ids (the token dimension unbacked, as the compiled graph expects)."""
    from torch._dynamo.decorators import mark_unbacked

    ids = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n))
    mark_unbacked(ids, 0)
    return {name: (lambda model=model: model(ids), None)
            for name, model in RankState.models.items()}
