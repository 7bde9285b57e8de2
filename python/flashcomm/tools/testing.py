"""Multi-process harness: a pool of ranks in one gloo group on loopback.

Each rank is a spawned process that joins a real c10d gloo ProcessGroup and then
runs the functions it is sent, so many test cases share one group instead of
paying a process start each. Functions must be importable (module level).
Used by the test suite, the demo and the benchmarks.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, timeout_s: float,
            tasks: "mp.Queue", results: "mp.Queue", env: dict[str, str]) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
            world_size=world_size, timeout=timedelta(seconds=timeout_s),
        )
        import flashcomm  # noqa: F401  (registers the ops)
    except BaseException:  # report start-up failures instead of hanging the parent
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args, kwargs = task
            try:
                results.put((rank, True, fn(*args, **kwargs)))
            except BaseException:
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankError(RuntimeError):
    """A function raised on one or more ranks; the message holds each traceback."""


class RankPool:
    """``world_size`` ranks in one gloo group, running functions on request.

    ``run(fn, *args)`` calls ``fn(*args)`` on every rank (inside the worker,
    ``torch.distributed`` is initialised and ``dist.get_rank()`` tells the rank)
    and returns the per-rank results in rank order.
    """

    def __init__(self, world_size: int, timeout_s: float = 120.0,
                 threads_per_rank: Optional[int] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
        port = free_port()
        self._results: mp.Queue = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, threads, timeout_s, self._tasks[r],
                      self._results, dict(env or {})),
                daemon=True,
            )
            for r in range(world_size)
        ]
        self.broken = False
        try:
            for p in self._procs:
                p.start()
            self._collect(timeout_s + 60.0)
        except BaseException:
            self.close()
            raise

    def _collect(self, timeout_s: float) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        errors: dict[int, str] = {}
        pending = set(range(self.world_size))
        while pending:
            try:
                rank, ok, value = self._results.get(timeout=timeout_s)
            except queue.Empty:
                self.broken = True
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                raise RankError(
                    f"ranks {sorted(pending)} gave no result within {timeout_s:.0f}s "
                    f"(dead processes: {dead}); errors so far: {errors}"
                ) from None
            pending.discard(rank)
            if ok:
                out[rank] = value
            else:
                errors[rank] = value
        if errors:
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankError(f"failed on ranks {sorted(errors)}:\n{msg}")
        return out

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: Optional[float] = None,
            **kwargs: Any) -> list[Any]:
        """Runs ``fn(*args, **kwargs)`` on every rank; returns results in rank order."""
        if self.broken:
            raise RankError("rank pool is broken by an earlier timeout; create a new one")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        # A rank that raises before a collective leaves its peers blocked in it;
        # they fail at the group timeout, so the wait below is bounded by it.
        return self._collect(timeout_s or self.timeout_s)

    def close(self) -> None:
        """Stops every rank (terminating those that do not exit)."""
        self.request_stop()
        self.join()

    def request_stop(self) -> None:
        """Asks every rank to exit, without waiting (:meth:`join` waits)."""
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive() and not self.broken:
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass

    def join(self) -> None:
        """Waits for every rank to exit, terminating those that do not within 10 s."""
        for p in self._procs:
            if p.pid is None:
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RankPools:
    """Lazily created :class:`RankPool` s keyed by world size and rank environment; a
    broken pool is replaced.

    ``teardown`` (a module-level function) runs on every healthy pool's ranks before it
    closes, e.g. to release per-process state the pool's functions set up."""

    def __init__(self, timeout_s: float = 120.0,
                 teardown: Optional[Callable[[], Any]] = None) -> None:
        self._pools: dict[tuple, RankPool] = {}
        self._timeout_s = timeout_s
        self._teardown = teardown

    def __call__(self, world_size: int, env: Optional[dict[str, str]] = None) -> RankPool:
        """The pool of ``world_size`` ranks whose processes run with ``env`` (e.g.
        ``{"FLASHCOMM_TRANSPORT": "c10d"}``) set before their group is created."""
        key = (world_size, tuple(sorted((env or {}).items())))
        pool = self._pools.get(key)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            pool = RankPool(world_size, timeout_s=self._timeout_s, env=env)
            self._pools[key] = pool
        return pool

    def close(self) -> None:
        """Stops every pool: all are asked to stop first, then waited for, so their ranks
        shut down (destroy their groups, unmap their transports) side by side."""
        try:
            for pool in self._pools.values():
                try:
                    if self._teardown is not None and not pool.broken:
                        pool.run(self._teardown)
                finally:
                    pool.request_stop()
        finally:
            for pool in self._pools.values():
                pool.join()
            self._pools.clear()
