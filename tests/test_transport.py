"""The transports: which one a group gets, that the ranks agree on it, that the
shared-memory one leaves nothing in /dev/shm (normal exit, exception, SIGKILL), that
diverging ranks get an error on every rank instead of garbage or a hang, that two groups
work at once, that messages larger than the segment budget stream exactly, at tp = 2..4.
Every test that changes a group's state uses its own fresh subgroup (dist.new_group), so
the pool's default group stays usable."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.reference import quantize_weight_per_channel, relative_error
from flashcomm.tools.testing import free_port

from _cases import error_of, rank_and_size, with_env


def _shm_entries() -> list[str]:
    """flashcomm's names in /dev/shm (every segment is unlinked once mapped)."""
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("fc-"))


def _fresh_group(transport: str | None = None) -> dist.ProcessGroup:
    """A new group over every rank; `transport` requested before its first use."""
    g = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    if transport is not None:
        torch.ops.flashcomm.set_transport(g.group_name, transport)
    return g


def _row_linear_on(group, n: int = 64, sp_threshold: int = 0) -> torch.Tensor:
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 32 * tp, generator=g)
    w = torch.randn(16, 32 * tp, generator=g)
    return flashcomm.sp_row_linear(x[:, 32 * rank:32 * rank + 32],
                                   w[:, 32 * rank:32 * rank + 32], None, group, sp_threshold)


# ---------------------------------------------------------------------------------------
# Choosing and agreeing
# ---------------------------------------------------------------------------------------

def _transport_after_first_use(requested):
    g = _fresh_group(requested)
    _row_linear_on(g)
    dist.barrier()
    return flashcomm.transport(g), _shm_entries()


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_auto_chooses_shared_memory_on_one_host(rank_pools, tp):
    results = rank_pools(tp).run(_transport_after_first_use, None)
    for chosen, entries in results:
        assert chosen == "shm"
        assert entries == []  # unlinked as soon as every rank mapped every segment


@pytest.mark.parametrize("requested", ["c10d", "shm"])
def test_requested_transport_is_used(rank_pools, requested):
    assert [t for t, _ in rank_pools(2).run(_transport_after_first_use, requested)] == \
        [requested] * 2


def _init_with_transport(requested):
    g = _fresh_group()
    flashcomm.init(g, transport=requested)
    return flashcomm.transport(g)


def test_init_takes_the_transport(rank_pools):
    assert rank_pools(2).run(_init_with_transport, "c10d") == ["c10d", "c10d"]


def _first_use_with_unmappable_rank(bad_rank, requested):
    os.environ.pop("FLASHCOMM_DEBUG_SHM_UNMAPPABLE", None)
    if dist.get_rank() == bad_rank:
        os.environ["FLASHCOMM_DEBUG_SHM_UNMAPPABLE"] = "1"
    try:
        g = _fresh_group(requested)
        msg = error_of(_row_linear_on, g)
        dist.barrier()  # every rank is past its set-up before anyone lists /dev/shm
        return msg, flashcomm.transport(g), _shm_entries()
    finally:
        os.environ.pop("FLASHCOMM_DEBUG_SHM_UNMAPPABLE", None)


def test_auto_falls_back_to_c10d_when_a_peer_cannot_be_mapped(rank_pools):
    results = rank_pools(2).run(_first_use_with_unmappable_rank, 1, None)
    for msg, chosen, entries in results:
        assert msg == "<no error>" and chosen == "c10d" and entries == []


def test_required_shm_that_cannot_be_mapped_is_an_error_on_every_rank(rank_pools):
    results = rank_pools(2).run(_first_use_with_unmappable_rank, 1, "shm")
    for msg, _, entries in results:
        assert "the shared-memory transport was requested for group" in msg, msg
        assert entries == []
    assert "simulated by FLASHCOMM_DEBUG_SHM_UNMAPPABLE" in results[1][0]
    assert "rank 1 could not map its peers' segments" in results[0][0]


def _first_use_with_rank_transport(requests):
    g = _fresh_group(requests[dist.get_rank()])
    return error_of(_row_linear_on, g)


def test_ranks_asking_for_different_transports_fail_at_first_use(rank_pools):
    for msg in rank_pools(2).run(_first_use_with_rank_transport, ["shm", "c10d"]):
        assert "sp_row_linear: the ranks of group" in msg, msg
        assert "transport request" in msg and "rank 0 = 2, rank 1 = 1" in msg, msg


# ---------------------------------------------------------------------------------------
# Diverging ranks: an error on every rank, naming what each rank did
# ---------------------------------------------------------------------------------------

def _rank_token_counts(ns, transport, debug_check):
    os.environ["FLASHCOMM_DEBUG_CHECK"] = "1" if debug_check else "0"
    try:
        g = _fresh_group(transport)
        flashcomm.init(g, sp_threshold=1000, threshold=-1, enabled=True)
        return error_of(_row_linear_on, g, ns[dist.get_rank()], 1000)
    finally:
        os.environ.pop("FLASHCOMM_DEBUG_CHECK", None)


@pytest.mark.parametrize("transport,debug_check", [("shm", False), ("c10d", True)])
def test_a_rank_with_another_token_count_fails_on_every_rank(rank_pools, transport,
                                                             debug_check):
    # n = 1001 on rank 0 (sharded: reduce-scatter), 999 on rank 1 (replicated:
    # all-reduce). Shared memory always compares fingerprints; c10d with
    # FLASHCOMM_DEBUG_CHECK=1 (without it gloo aborts the process).
    start = time.monotonic()
    messages = rank_pools(2).run(_rank_token_counts, [1001, 999], transport, debug_check)
    assert time.monotonic() - start < 60
    for msg in messages:
        assert msg.startswith("sp_row_linear: "), msg
        assert "reduce_scatter" in msg and "all_reduce" in msg, msg
        assert "n=1001" in msg and "n=999" in msg, msg
        assert "mode sharded" in msg and "mode replicated" in msg, msg


def _rank_sizes_differ(transport):
    g = _fresh_group(transport)
    rank, _ = rank_and_size()
    flashcomm.init(g)
    x = torch.randn(8 + 8 * rank, 16)  # a different message size on each rank
    return error_of(flashcomm.sp_reduce, x, g, 0)


def test_different_message_sizes_fail_on_every_rank_over_shared_memory(rank_pools):
    for msg in rank_pools(2).run(_rank_sizes_differ, "shm"):
        assert msg.startswith("sp_reduce: collective on group"), msg
        assert "differs between ranks" in msg or "aborted" in msg, msg


# ---------------------------------------------------------------------------------------
# Two groups at once; streaming; exactness against c10d
# ---------------------------------------------------------------------------------------

def _two_subgroups_at_once():
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = pairs[rank // 2]
    world = _fresh_group()
    outs = []
    for i in range(5):  # interleave a pair group and the whole world
        t = torch.full((64, 8), float(rank + i))
        outs.append(flashcomm.sp_reduce(t, mine, 1000).clone())
        outs.append(flashcomm.sp_reduce(t, world, 1000).clone())
    return outs, flashcomm.transport(mine), flashcomm.transport(world)


def test_two_subgroups_of_a_four_rank_world_at_once(rank_pools):
    results = rank_pools(4).run(_two_subgroups_at_once)
    for rank, (outs, t_pair, t_world) in enumerate(results):
        assert t_pair == t_world == "shm"
        pair = (0, 1) if rank < 2 else (2, 3)
        for i in range(5):
            assert torch.equal(outs[2 * i], torch.full((64, 8), float(sum(pair) + 2 * i)))
            assert torch.equal(outs[2 * i + 1], torch.full((64, 8), float(6 + 4 * i)))


def _big_collectives():
    rank, tp = rank_and_size()
    g = torch.Generator().manual_seed(7)
    n, K, N = 3000, 96, 512  # partials of 6 MB, far over a 64 KiB segment
    x = torch.randn(n, K * tp, generator=g)
    w = torch.randn(N, K * tp, generator=g) / K**0.5
    xs, ws = x[:, K * rank:K * rank + K], w[:, K * rank:K * rank + K]
    w_q, w_s = quantize_weight_per_channel(torch.randn(N, 64, generator=g))
    x8 = torch.randn(n, 64, generator=g)
    results = {}
    for transport in ("shm", "c10d"):
        grp = _fresh_group(transport)
        results[transport] = {
            "all_reduce": flashcomm.sp_row_linear(xs, ws, None, grp, n),  # replicated
            "reduce_scatter": flashcomm.gemm_rs(xs, ws, None, grp, threshold=100),
            "w8a8_all_gather": flashcomm.sp_column_linear_w8a8(
                x8, w_q, w_s, None, None, None, grp, torch.float32, 0, True, 100),
            "bf16_all_reduce": flashcomm.sp_reduce(torch.full((n, N), 0.1 * (rank + 1),
                                                              dtype=torch.bfloat16), grp, n),
        }
    return results, x.double() @ w.double().t()


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_messages_over_the_budget_stream_exactly(rank_pools, tp):
    pool = rank_pools(tp, env={"FLASHCOMM_SHM_BYTES": str(64 << 10)})
    for rank, (results, dense) in enumerate(pool.run(_big_collectives, timeout_s=600)):
        shm, c10d = results["shm"], results["c10d"]
        assert relative_error(shm["all_reduce"], dense) < 1e-5
        assert relative_error(shm["all_reduce"], c10d["all_reduce"]) < 1e-6
        assert relative_error(shm["reduce_scatter"], c10d["reduce_scatter"]) < 1e-6
        # int8 rows + their scales are moved, never summed: bitwise equal.
        assert torch.equal(shm["w8a8_all_gather"], c10d["w8a8_all_gather"])
        # bf16 sums accumulate in fp32 and round once.
        want = sum(torch.tensor(0.1 * (r + 1), dtype=torch.bfloat16).float()
                   for r in range(tp)).to(torch.bfloat16)
        assert torch.equal(shm["bf16_all_reduce"], torch.full_like(shm["bf16_all_reduce"], want))


# ---------------------------------------------------------------------------------------
# All-reduce algorithms (one-shot, two-shot) and overlapped reductions
# ---------------------------------------------------------------------------------------

NEVER = str(1 << 62)  # FLASHCOMM_SHM_TWO_SHOT_BYTES larger than any message


def _all_reduces(dtype, n, K, N):
    """A replicated sp_row_linear (the GEMM writes into the slot) and an sp_reduce of an
    engine's partial, on a fresh shared-memory group; with the transport counters."""
    rank, tp = rank_and_size()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, K * tp, generator=g).to(dtype)
    w = (torch.randn(N, K * tp, generator=g) / K**0.5).to(dtype)
    partial = (torch.randn(n, N, generator=g) * (rank + 1)).to(dtype)
    grp = _fresh_group("shm")
    flashcomm.init(grp)
    _row_linear_on(grp)  # set-up outside the counted calls
    flashcomm.reset_stats()
    out = {"linear": flashcomm.sp_row_linear(x[:, K * rank:K * rank + K],
                                             w[:, K * rank:K * rank + K], None, grp, n),
           "reduce": flashcomm.sp_reduce(partial, grp, n)}
    return out, flashcomm.stats()["shm_all_reduce"], x.double() @ w.double().t()


def _one_and_two_shot(dtype, n, K, N, budget):
    env = {"FLASHCOMM_SHM_BYTES": str(budget)}
    return {setting: with_env({**env, "FLASHCOMM_SHM_TWO_SHOT_BYTES": setting},
                               _all_reduces, dtype, n, K, N)
            for setting in ("0", NEVER)}


ALL_REDUCE_DTYPES = [torch.float32, torch.bfloat16]
# (n, K, N): rows of odd widths (parts not on 64-byte lines); one piece, and many pieces
# of a 64 KiB budget.
ALL_REDUCE_SHAPES = [(7, 24, 33), (333, 40, 257)]


@pytest.mark.parametrize("n,K,N", ALL_REDUCE_SHAPES)
@pytest.mark.parametrize("dtype", ALL_REDUCE_DTYPES)
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_two_shot_all_reduce_equals_one_shot_bitwise(rank_pools, tp, dtype, n, K, N):
    results = rank_pools(tp).run(_one_and_two_shot, dtype, n, K, N, 64 << 10)
    rows_per_step = (32 << 10) // (N * dtype.itemsize)  # a slot is half the budget
    pieces = -(-n // rows_per_step)  # steps of one all-reduce
    for rank, by_setting in enumerate(results):
        (two, two_counts, dense), (one, one_counts, _) = by_setting["0"], by_setting[NEVER]
        # Which algorithm ran: every step of both calls.
        assert two_counts == {"one_shot": 0, "two_shot": 2 * pieces}, two_counts
        assert one_counts == {"one_shot": 2 * pieces, "two_shot": 0}, one_counts
        for what in ("linear", "reduce"):
            # The same kernel sums each element in the same rank order.
            assert torch.equal(two[what], one[what]), (rank, what)
            assert torch.equal(two[what], results[0]["0"][0][what]), (rank, what)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert relative_error(two["linear"], dense) < tol


def _default_algorithm_by_size():
    grp = _fresh_group("shm")
    flashcomm.init(grp)
    _row_linear_on(grp)
    counts = {}
    for rows in (8, 4096):  # 8 x 64 fp32 = 2 KiB; 4096 x 64 = 1 MiB (256 KiB steps ...)
        flashcomm.reset_stats()
        flashcomm.sp_reduce(torch.ones(rows, 64), grp, rows)
        counts[rows] = flashcomm.stats()["shm_all_reduce"]
    return counts


@pytest.mark.parametrize("tp", [2, 3])
def test_default_two_shot_from_three_ranks_and_256_kib(rank_pools, tp):
    for counts in rank_pools(tp).run(_default_algorithm_by_size):
        assert counts[8] == {"one_shot": 1, "two_shot": 0}, counts
        big = counts[4096]
        # A 2 MiB budget streams the 1 MiB message in steps of 1 MiB.
        assert (big["two_shot"] > 0) == (tp >= 3) and (big["one_shot"] > 0) == (tp < 3), counts


def _rank_two_shot_settings(settings):
    return with_env({"FLASHCOMM_SHM_TWO_SHOT_BYTES": settings[dist.get_rank()]},
                     error_of, lambda: _row_linear_on(_fresh_group("shm")))


def test_ranks_with_different_two_shot_sizes_fail_at_first_use(rank_pools):
    for msg in rank_pools(2).run(_rank_two_shot_settings, ["0", "-1"]):
        assert "FLASHCOMM_SHM_TWO_SHOT_BYTES" in msg and "rank 0 = 0, rank 1 = -1" in msg, msg


def _first_use_with(var, value):
    return with_env({var: value}, error_of, lambda: _row_linear_on(_fresh_group("shm")))


def test_bad_two_shot_and_overlap_values_name_the_variable(rank_pools):
    for var, value in (("FLASHCOMM_SHM_TWO_SHOT_BYTES", "lots"),
                       ("FLASHCOMM_SHM_OVERLAP", "sometimes")):
        for msg in rank_pools(2).run(_first_use_with, var, value):
            assert var in msg and value in msg, msg


def _pipelined_reductions(overlap, dtype):
    """Pipelined gemm_rs and a sharded sp_row_linear (many steps: a 64 KiB budget) with
    the reductions overlapped or not; their outputs and the transport counters."""
    rank, tp = rank_and_size()
    g = torch.Generator().manual_seed(5)
    n, K, N = 1003, 32, 96
    x = torch.randn(n, K * tp, generator=g).to(dtype)
    w = (torch.randn(N, K * tp, generator=g) / K**0.5).to(dtype)
    xs, ws = x[:, K * rank:K * rank + K], w[:, K * rank:K * rank + K]

    def run():
        grp = _fresh_group("shm")
        flashcomm.init(grp)
        _row_linear_on(grp)
        flashcomm.reset_stats()
        c = -(-n // tp)
        owned = slice(rank * c, min(n, rank * c + c))  # sp_row_linear's valid rows
        outs = {"gemm_rs": flashcomm.gemm_rs(xs, ws, None, grp, threshold=0),
                "sp_row_linear": flashcomm.sp_row_linear(xs, ws, None, grp, 0)[owned]}
        return outs, flashcomm.stats()["shm_reduce"]

    return with_env({"FLASHCOMM_SHM_OVERLAP": overlap, "FLASHCOMM_SHM_BYTES": str(64 << 10)},
                     run)


@pytest.mark.parametrize("dtype", ALL_REDUCE_DTYPES)
@pytest.mark.parametrize("tp", [2, 3])
def test_overlapped_reductions_equal_inline_ones(rank_pools, tp, dtype):
    pool = rank_pools(tp)
    overlapped = pool.run(_pipelined_reductions, "on", dtype)
    inline = pool.run(_pipelined_reductions, "off", dtype)
    for (outs_on, counts_on), (outs_off, counts_off) in zip(overlapped, inline):
        assert counts_on["overlapped"] > 2 and counts_on["inline"] == 0, counts_on
        assert counts_off["inline"] == counts_on["overlapped"], counts_off
        assert counts_off["overlapped"] == 0, counts_off
        for op in outs_on:
            assert torch.equal(outs_on[op], outs_off[op]), op


def _auto_overlap(cpus, threads):
    """The transport counters of one pipelined gemm_rs under FLASHCOMM_SHM_OVERLAP=auto
    with this rank bound to ``cpus`` (None: as it is) and ``threads`` intra-op threads."""
    saved_cpus, saved_threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus[dist.get_rank()])
        torch.set_num_threads(threads)
        mine = os.sched_getaffinity(0)
        _, counts = _pipelined_reductions("auto", torch.float32)
        return sorted(mine), counts
    finally:
        os.sched_setaffinity(0, saved_cpus)
        torch.set_num_threads(saved_threads)


def test_auto_overlaps_only_with_a_spare_cpu(rank_pools):
    cpus = sorted(os.sched_getaffinity(0))
    pool = rank_pools(2)
    cases = [(None, 1)]  # both ranks on every CPU, one thread each
    if len(cpus) >= 2:
        cases.append(([{cpus[0]}, {cpus[1]}], 1))  # a CPU each, no spare
    if len(cpus) >= 4:
        cases.append(([set(cpus[:2]), set(cpus[2:4])], 1))  # two CPUs each, one spare
    for bind, threads in cases:
        results = pool.run(_auto_overlap, bind, threads)
        mine = [set(m) for m, _ in results]
        for rank, (_, counts) in enumerate(results):
            sharing = [r for r in range(2) if r == rank or mine[r] & mine[rank]]
            shared = set().union(*(mine[r] for r in sharing))
            spare = len(shared) > threads * len(sharing)
            path = "overlapped" if spare else "inline"
            assert counts[path] > 0 and counts["inline" if spare else "overlapped"] == 0, \
                (bind, rank, counts)


# ---------------------------------------------------------------------------------------
# Nothing left behind: exception, SIGKILL mid-collective
# ---------------------------------------------------------------------------------------

def _exception_after_setup():
    g = _fresh_group("shm")
    _row_linear_on(g)
    err = error_of(flashcomm.sp_row_linear, torch.randn(4, 8), torch.randn(4, 9), None, g)
    dist.barrier()
    return err, _shm_entries()


def test_nothing_left_after_an_exception(rank_pools):
    for err, entries in rank_pools(2).run(_exception_after_setup):
        assert "K mismatch" in err and entries == []


def _killed_rank_worker(rank, port, results):
    os.environ["FLASHCOMM_TRANSPORT"] = "shm"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=20))
    torch.set_num_threads(1)
    x = torch.randn(64, 16)
    flashcomm.sp_reduce(x, None, 0)  # set-up and one collective on both ranks
    results.put(("ready", rank, _shm_entries()))
    if rank == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)  # dies while rank 0 waits in the collective
    start = time.monotonic()
    msg = error_of(flashcomm.sp_reduce, x, None, 0)
    results.put(("error", rank, (msg, time.monotonic() - start)))


def test_sigkill_of_a_rank_mid_collective():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_killed_rank_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in range(3)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    ready = [g for g in got if g[0] == "ready"]
    assert len(ready) == 2 and all(entries == [] for _, _, entries in ready)
    (_, rank, (msg, elapsed)), = [g for g in got if g[0] == "error"]
    assert rank == 0
    assert "rank 1" in msg and ("died" in msg or "aborted" in msg or "closed" in msg), msg
    assert elapsed < 20, f"the survivor waited {elapsed:.1f}s, longer than the group timeout"
    assert procs[1].exitcode == -signal.SIGKILL
    assert _shm_entries() == []
