"""Per-step trace of a vLLM server's workers, for ``benchmarks/serve_bench.py``.

A vLLM general plugin of the benchmark only (``serve_bench.py`` declares it through a
generated dist-info on the server's ``PYTHONPATH``; nothing in flashcomm loads it). When
``FLASHCOMM_BENCH_STEP_TRACE=PREFIX`` is set, each worker appends one JSON line per engine
step to ``PREFIX.rank<R>.jsonl``:

    {"t": wall-clock start (s), "ms": duration of the worker's execute_model (ms),
     "n": tokens scheduled in the step, "reqs": requests in it, "dec": requests with one
     token (decodes), "sh": flashcomm calls counted sharded during the step, "rep":
     counted replicated}

``sh`` / ``rep`` are the step's deltas of the workers' counters (``flashcomm.stats()``,
summed over ops) and are absent when flashcomm is off. A step's mode is "sharded" when
only ``sh`` moved, "replicated" when only ``rep`` did. Cost: one ``flashcomm.stats()``
(about 15 us) and one line written per step.
"""

from __future__ import annotations

import json
import os
import time

ENV_TRACE = "FLASHCOMM_BENCH_STEP_TRACE"
_PATCHED = False


def _mode_totals() -> tuple[int, int]:
    import flashcomm
    sh = rep = 0
    for modes in flashcomm.stats().values():
        sh += modes.get("sharded", 0)
        rep += modes.get("replicated", 0)
    return sh, rep


def register() -> None:
    """vLLM calls this in every process; only workers run ``execute_model``."""
    global _PATCHED
    prefix = os.environ.get(ENV_TRACE)
    if not prefix or _PATCHED:
        return
    _PATCHED = True
    from vllm.v1.worker.gpu_worker import Worker  # CPUWorker inherits execute_model

    original = Worker.execute_model
    state: dict = {}

    def execute_model(self, scheduler_output):
        if "file" not in state:
            # flashcomm is on where its plugin says so for this worker's configuration
            # (--additional-config first, then FLASHCOMM_ENABLE).
            from flashcomm.vllm.plugin import enabled
            state["counted"] = enabled(getattr(self.vllm_config, "additional_config", None))
            # Line-buffered: one write per step (a few us), and nothing is lost when the
            # server's processes end without flushing.
            state["file"] = open(f"{prefix}.rank{self.rank}.jsonl", "a", buffering=1)
            state["last"] = _mode_totals() if state["counted"] else (0, 0)
        t0 = time.time()
        p0 = time.perf_counter()
        out = original(self, scheduler_output)
        ms = (time.perf_counter() - p0) * 1e3
        n = scheduler_output.total_num_scheduled_tokens
        if n:
            per_req = scheduler_output.num_scheduled_tokens.values()
            rec = {"t": round(t0, 4), "ms": round(ms, 3), "n": n, "reqs": len(per_req),
                   "dec": sum(1 for k in per_req if k == 1)}
            if state["counted"]:
                now = _mode_totals()
                rec["sh"], rec["rep"] = now[0] - state["last"][0], now[1] - state["last"][1]
                state["last"] = now
            state["file"].write(json.dumps(rec, separators=(",", ":")) + "\n")
        return out

    Worker.execute_model = execute_model
