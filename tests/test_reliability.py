"""Rank agreement and timeouts: a rank that would take a different collective
path, or never joins, makes every rank fail fast with a clear error, not hang.
Each test uses its own fresh group (agreement runs at a group's first use)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import flashcomm
from flashcomm.tools.testing import RankPool, free_port

from _cases import error_of, with_env
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


# ---------------------------------------------------------------------------------------
# The shared-memory transport under faults: a forked rank, an exception inside a step, a
# rank killed during set-up, bad settings, diverging sizes
# ---------------------------------------------------------------------------------------

def _shm_group() -> dist.ProcessGroup:
    g = dist.new_group([0, 1], backend="gloo")
    torch.ops.flashcomm.set_transport(g.group_name, "shm")
    return g


def _pipelined_gemm_rs(g, rank: int, seed: int = 5) -> torch.Tensor:
    """A pipelined gemm_rs (many steps through a 64 KiB budget) and its expected output."""
    gen = torch.Generator().manual_seed(seed)
    n, K, N = 1003, 32, 96
    x = torch.randn(n, 2 * K, generator=gen)
    w = torch.randn(N, 2 * K, generator=gen) / K**0.5
    out = flashcomm.gemm_rs(x[:, K * rank:K * rank + K], w[:, K * rank:K * rank + K], None, g,
                            threshold=0)
    c = -(-n // 2)
    want = (x.double() @ w.double().t())[rank * c:min(n, rank * c + c)].float()
    return (out[:want.shape[0]] - want).abs().max().item()


def _wait_for_child(pid: int, limit_s: float = 60.0) -> str:
    """'exit <code>' of the forked child, or 'hung' (killed) when it has not ended by then."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.waitstatus_to_exitcode(status)}"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def _keep_process_groups_alive() -> None:
    """torch's own ProcessGroupGloo cannot be destroyed in a forked child (its destructor
    joins worker threads the child does not have: a hang or a crash, flashcomm or not), so the
    child keeps its c10d groups alive; everything of flashcomm is still torn down at exit."""
    import ctypes

    for pg in list(dist.distributed_c10d._world.pg_map):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))


def _fork_and_end(g, call_an_op: bool) -> tuple[str, str]:
    """Forks; the child (optionally calling an op on the inherited group) ends with sys.exit().
    Returns the child's end and the op's error text in the child."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        os.close(read_fd)
        msg = "<not called>"
        if call_an_op:
            try:
                flashcomm.sp_reduce(torch.ones(8, 8), g, 1 << 20)
                msg = "<no error>"
            except RuntimeError as e:
                msg = str(e)
        os.write(write_fd, msg.encode())
        os.close(write_fd)
        _keep_process_groups_alive()
        sys.exit(0)
    os.close(write_fd)
    end = _wait_for_child(pid)
    with os.fdopen(read_fd, "rb") as f:
        return end, f.read().decode()


def _forking_rank(rank: int, port: int, overlap: str, results) -> None:
    os.environ.update({"FLASHCOMM_SHM_OVERLAP": overlap, "FLASHCOMM_SHM_BYTES": str(64 << 10)})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        g = _shm_group()
        flashcomm.reset_stats()
        before = _pipelined_gemm_rs(g, rank)  # starts the helper thread when overlapped
        overlapped = flashcomm.stats()["shm_reduce"]["overlapped"]
        children = []
        if rank == 0:
            children = [_fork_and_end(g, call_an_op=False), _fork_and_end(g, call_an_op=True)]
        # The peer runs on meanwhile: its steps wait for rank 0, whose children are gone.
        after = [_pipelined_gemm_rs(g, rank, seed=6),
                 flashcomm.sp_reduce(torch.full((8, 8), rank + 1.0), g, 1 << 20)[0, 0].item()]
        results.put((rank, ("ok", before, overlapped, children, after)))
    except Exception:  # a forked child's SystemExit is not caught here
        results.put((rank, ("error", traceback.format_exc())))


@pytest.mark.parametrize("overlap", ["on", "off"])
def test_a_forked_child_never_touches_the_parents_group(overlap):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_forking_rank, args=(r, port, overlap, results))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=300) for _ in range(2))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        assert got[rank][0] == "ok", got[rank][1]
        _, before, overlapped, children, after = got[rank]
        assert before < 1e-4 and after[0] < 1e-4, (before, after)
        assert after[1] == 3.0
        assert (overlapped > 0) == (overlap == "on"), overlapped
    (end_plain, _), (end_op, msg) = got[0][3]
    assert end_plain == "exit 0" and end_op == "exit 0", (end_plain, end_op)
    assert msg.startswith("sp_reduce: collective on group"), msg
    assert "a forked child cannot use its parent's shared-memory channel" in msg, msg


def _step_that_throws(where: str, overlap: str):
    """Rank 0 injects a C++ exception (FLASHCOMM_DEBUG_THROW) into a pipelined gemm_rs; then
    every rank tries the group once more."""
    rank = dist.get_rank()
    env = {"FLASHCOMM_SHM_OVERLAP": overlap, "FLASHCOMM_SHM_BYTES": str(64 << 10),
           "FLASHCOMM_DEBUG_THROW": where if rank == 0 else ""}
    g = with_env(env, _shm_group)
    flashcomm.init(g)  # reads the settings, sets up the transport
    flashcomm.reset_stats()
    first = error_of(_pipelined_gemm_rs, g, rank)
    counts = flashcomm.stats()["shm_reduce"]
    second = error_of(flashcomm.sp_reduce, torch.ones(8, 8), g, 1 << 20)
    return first, second, counts


@pytest.mark.parametrize("where,overlap", [("gemm", "off"), ("sum", "off"), ("sum", "on")])
def test_an_exception_inside_a_step_reaches_every_rank(where, overlap):
    # The group timeout is far beyond the test's: a peer that waited for it would hang here.
    pool = _fresh_pool(timeout_s=600, transport="shm")
    try:
        (first0, second0, counts0), (first1, second1, _) = pool.run(
            _step_that_throws, where, overlap, timeout_s=120)
    finally:
        pool.close()
    injected = f"injected by FLASHCOMM_DEBUG_THROW={where}"
    assert injected in first0, first0
    # The failing sum ran on the helper thread exactly when overlapped.
    assert (counts0["overlapped"] > 0) == (where == "sum" and overlap == "on"), counts0
    # The peer fails fast, quoting the cause, not at its timeout.
    assert first1.startswith("gemm_rs: collective on group"), first1
    assert "rank 0 aborted" in first1 and injected in first1, first1
    # Rank 0's next call names the cause, not a step-order misuse.
    assert "broken channel" in second0 and injected in second0, second0
    assert "before publish" not in second0, second0
    assert second1 != "<no error>", second1


def _shm_names() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("fc-")}


def _creator_pid(name: str) -> int:
    """The pid in a segment's header (layout.h: Identity.pid at byte 56)."""
    with open(os.path.join("/dev/shm", name), "rb") as f:
        return struct.unpack_from("<Q", f.read(64), 56)[0]


def _dies_during_setup(port: int) -> None:
    os.environ.update({"FLASHCOMM_TRANSPORT": "shm", "FLASHCOMM_DEBUG_FORCE_COLLECTIVES": "1",
                       "FLASHCOMM_DEBUG_SHM_DIE_AFTER_CREATE": "1"})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    flashcomm.sp_reduce(torch.ones(4, 4), None, 0)  # set-up: SIGKILLed after creating


def _new_group_then_list(names):
    g = dist.new_group([0, 1], backend="gloo")
    flashcomm.init(g, transport="shm")
    dist.barrier()
    return flashcomm.transport(g), sorted(_shm_names() & set(names))


def test_a_segment_left_by_a_rank_killed_during_setup_is_reclaimed():
    ctx = mp.get_context("spawn")
    victim = ctx.Process(target=_dies_during_setup, args=(free_port(),))
    victim.start()
    victim.join(timeout=120)
    assert victim.exitcode == -signal.SIGKILL, victim.exitcode
    left = sorted(n for n in _shm_names() if _creator_pid(n) == victim.pid)
    assert len(left) == 1, left  # the hook fired between create and unlink
    pool = _fresh_pool(transport="shm")
    try:
        for transport, still_there in pool.run(_new_group_then_list, left):
            assert transport == "shm" and still_there == [], still_there
    finally:
        pool.close()


def _first_use_with(env, requested):
    def first_use():
        g = dist.new_group([0, 1], backend="gloo")
        if requested is not None:
            torch.ops.flashcomm.set_transport(g.group_name, requested)
        flashcomm.sp_reduce(torch.ones(4, 4), g, 1 << 20)
        return flashcomm.transport(g)
    try:
        return with_env(env, first_use)
    except RuntimeError as e:
        return str(e)


BAD_SETTINGS = [("FLASHCOMM_SHM_YIELD_US", "-1"), ("FLASHCOMM_SHM_YIELD_US", "5ms"),
                ("FLASHCOMM_SHM_BYTES", "99999999999999999999"),
                ("FLASHCOMM_SHM_BYTES", "4096"),
                ("FLASHCOMM_SHM_TWO_SHOT_BYTES", "99999999999999999999"),
                ("FLASHCOMM_SHM_OVERLAP", "sometimes")]


def test_shm_settings_are_checked_where_read_in_auto_and_shm_mode(rank_pools):
    pool = rank_pools(2)
    for requested in (None, "shm"):  # auto must not fall back quietly on a typo
        for var, value in BAD_SETTINGS:
            for msg in pool.run(_first_use_with, {var: value}, requested):
                assert var in msg and repr(value) in msg.replace('"', "'"), (requested, msg)
        # A yield phase of 0 µs is valid (sleep at once): shared memory stays on.
        assert pool.run(_first_use_with, {"FLASHCOMM_SHM_YIELD_US": "0"}, requested) == \
            ["shm", "shm"]


def _plain_all_reduce_of_rank_sizes(elems):
    g = with_env({"FLASHCOMM_SHM_BYTES": str(64 << 10)}, _shm_group)
    flashcomm.init(g)
    # A 32 KiB slot holds 8192 fp32: rank 0 sends 2 pieces, rank 1 sends 3.
    x = torch.ones(elems[dist.get_rank()])
    return error_of(torch.ops.flashcomm_testing.all_reduce, x, g.group_name)


def test_a_plain_all_reduce_of_different_sizes_fails_on_every_rank():
    pool = _fresh_pool(timeout_s=600, transport="shm")
    try:
        messages = pool.run(_plain_all_reduce_of_rank_sizes, [2 * 8192, 3 * 8192], timeout_s=120)
    finally:
        pool.close()
    for msg in messages:
        assert msg.startswith("flashcomm_testing::all_reduce: collective on group"), msg
        assert "step 1 differs between ranks" in msg, msg
        assert "65536 bytes" in msg and "98304 bytes" in msg, msg
