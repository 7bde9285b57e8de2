"""The README's serving command, run as a user runs it: ``flashcomm serve MODEL
--tensor-parallel-size 2 --additional-config '{"flashcomm": {...}}'`` (vLLM's
OpenAI-compatible server, ``vllm serve``, with flashcomm's plugin), compared with the same
server started without flashcomm (``FLASHCOMM_ENABLE=0 flashcomm serve ...``).

The server with flashcomm takes every flashcomm setting from ``--additional-config``
(``enable``, ``sp_threshold``, ``stats_file``, ``stats_interval``, ``transport``) while
its environment says otherwise (``FLASHCOMM_ENABLE=0``, ``FLASHCOMM_SP_THRESHOLD`` far
above every prompt): the config wins, which the ``flashcomm: active`` lines, the stats
documents and the counters of both modes show. A bad setting fails start-up in the API
server, before any engine process starts, with an error naming the key
(:func:`test_bad_setting_fails_start_up_naming_the_key`, no model needed).

Each server is a subprocess in its own session, on a free loopback port, with vLLM's
default compilation (Inductor; no ``VLLM_CPU_CI_ENV``), the tiny float32 Qwen3
checkpoint with its trained tokenizer and token-id prompts over HTTP
(``/v1/completions``): one prompt above
``FLASHCOMM_SP_THRESHOLD`` (its prefill runs sharded) and one below (replicated, as
every decode step). Checked: greedy token ids identical with flashcomm on and off; the
server log has vLLM's ``flashcomm: active`` line from each of the 2 workers (none
without flashcomm); ``FLASHCOMM_STATS_FILE`` counters, read while the server runs,
moved in both modes in every worker during the requests; the server stops on SIGINT
within ``STOP_TIMEOUT_S`` and no process it started is left (every process carries a
marker variable in its environment; ``/proc`` is searched for it).

The same servers give the smoke run of the serving benchmark (``benchmarks/
serve_bench.py``, issue 22), so that it keeps working without servers of its own: vLLM's
benchmark client sends four text prompts at once to each, with the benchmark's per-step
trace in the workers; checked are sane figures, the trace's modes (the on server ran
both, each step as the rule says) and the on/off ratios of the benchmark's summary.

Processes per server: the ``flashcomm serve`` process (vLLM's API server), vLLM's engine
core, 2 workers, and the helpers multiprocessing starts (resource tracker).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from _vllm_cases import ACTIVE, CPU_VIEW, expected_conversion, missing_modes, requires_vllm
from flashcomm.tools.vllm_engine import (SP_THRESHOLD, make_checkpoint, remove_left_shm,
                                         shm_mapped_by, vllm_env)

pytestmark = requires_vllm
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_bench  # noqa: E402  (benchmarks/serve_bench.py)

LONG_PROMPT = [(5 * j + 7) % 500 + 3 for j in range(2 * SP_THRESHOLD + 8)]  # > threshold
SHORT_PROMPT = [(3 * j + 11) % 500 + 3 for j in range(SP_THRESHOLD // 2)]  # < threshold
MAX_TOKENS = 8
READY_TIMEOUT_S = int(os.environ.get("FLASHCOMM_VLLM_TEST_TIMEOUT", "900"))
REQUEST_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60
STATS_INTERVAL_S = 1
SERVED_NAME = "tiny"
# The environment's threshold, which --additional-config's overrides: above every prompt
# here, so no forward would run sharded if the variable were read.
ENV_SP_THRESHOLD = 100 * SP_THRESHOLD
MARKER = "FLASHCOMM_TEST_SERVER_ID"
# The serving benchmark's smoke run: 4 text prompts above SP_THRESHOLD, all at once.
BENCH_MIX = serve_bench.parse_mix("1:24-40:3-5")
BENCH_PROMPTS = 4


def serve_command() -> list[str]:
    """``flashcomm serve`` as installed beside this interpreter (the console script
    ``pip install -e .`` writes), else ``python -m flashcomm serve`` (the same code)."""
    script = Path(sys.executable).with_name("flashcomm")
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m", "flashcomm",
                                                           "serve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[int]:
    """Pids of this user's processes whose environment holds ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            pass
    return pids


class Server:
    """One ``flashcomm serve`` subprocess; a context manager that always leaves no
    process behind (SIGINT, then SIGKILL of whatever still carries its marker)."""

    def __init__(self, tmp: Path, model: Path, enable: bool) -> None:
        # flashcomm's settings: from --additional-config, against the environment.
        self.name = "on" if enable else "off"
        self.port = _free_port()
        self.marker = uuid.uuid4().hex
        self.log_path = tmp / f"serve_{self.name}.log"
        self.stats_prefix = tmp / f"stats_{self.name}"
        self.cmd = serve_command() + [
            str(model), "--tensor-parallel-size", "2", "--dtype", "float32",
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0"]
        self.env = vllm_env(tmp, False, 2, "inductor", CPU_VIEW)
        self.env.update({MARKER: self.marker, "FLASHCOMM_SP_THRESHOLD": str(ENV_SP_THRESHOLD)})
        if enable:
            self.cmd += ["--additional-config", json.dumps({"flashcomm": {
                "enable": True, "sp_threshold": SP_THRESHOLD, "transport": "shm",
                "stats_file": str(self.stats_prefix), "stats_interval": STATS_INTERVAL_S}})]
        self.trace_prefix = tmp / f"trace_{self.name}"
        self.env.update(serve_bench.trace_env(tmp, self.trace_prefix, self.env["PYTHONPATH"]))
        self.proc: subprocess.Popen | None = None
        self.stop_s: float | None = None
        self.shm_removed: list[str] = []

    def __enter__(self) -> "Server":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=str(self.log_path.parent))
        return self

    def __exit__(self, *exc) -> None:
        # After stop(), or when the test failed before it: nothing of the server stays.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        for pid in processes_with(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self) -> float:
        t0 = time.time()
        while time.time() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                pytest.fail(f"server ({self.name}) exited with {self.proc.returncode} before "
                            f"it was ready:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return time.time() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        pytest.fail(f"server ({self.name}) not ready after {READY_TIMEOUT_S} s:\n"
                    f"{self.log()[-6000:]}")

    def complete(self, prompt: list[int]) -> list[int]:
        """Greedy completion of a token-id prompt; the generated token ids."""
        body = json.dumps({"model": SERVED_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
                           "temperature": 0.0, "ignore_eos": True,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(self.url("/v1/completions"), data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            out = json.loads(r.read())
        ids = out["choices"][0]["token_ids"]
        assert len(ids) == MAX_TOKENS, out
        return ids

    def stats_files(self) -> list[Path]:
        return sorted(p for p in self.stats_prefix.parent.glob(self.stats_prefix.name + ".*")
                      if p.suffix != ".tmp")

    def stats_after(self, t: float) -> dict[int, dict]:
        """Every worker's stats document written after time ``t`` (waits for them)."""
        deadline = time.time() + 10 * STATS_INTERVAL_S + 10
        while True:
            docs = [json.loads(p.read_text()) for p in self.stats_files()]
            if len(docs) == 2 and all(d["time"] > t for d in docs):
                return {d["rank"]: d for d in docs}
            if time.time() > deadline:
                pytest.fail(f"server ({self.name}): no fresh stats from 2 workers in "
                            f"{self.stats_files()}: {docs}")
            time.sleep(STATS_INTERVAL_S / 2)

    def stop(self) -> float:
        """SIGINT (Ctrl-C) to the server; seconds until it and everything it started
        exited. Fails the test after STOP_TIMEOUT_S (the caller's exit kills them), or
        when shared memory other than vLLM's own CPU segments outlives the server."""
        shm = shm_mapped_by(processes_with(self.marker))
        t0 = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        while processes_with(self.marker) and time.time() - t0 < STOP_TIMEOUT_S:
            time.sleep(0.5)
        self.stop_s = time.time() - t0
        left = processes_with(self.marker)
        assert not left, (f"server ({self.name}) left processes {left} "
                          f"{STOP_TIMEOUT_S} s after SIGINT:\n{self.log()[-3000:]}")
        self.shm_removed, shm_left = remove_left_shm(shm)
        assert not shm_left, f"server ({self.name}) left shared memory {shm_left}"
        return self.stop_s


def _delta(after: dict, before: dict) -> dict:
    return {op: {mode: n - before.get(op, {}).get(mode, 0) for mode, n in modes.items()}
            for op, modes in after.items()}


def test_flashcomm_serve_matches_vllm_alone(tmp_path):
    model = make_checkpoint(tmp_path, "qwen3", "--arch", "qwen3", "--tokenizer")
    prompts = serve_bench.write_prompt_sets(model, BENCH_MIX, ["inf"], BENCH_PROMPTS, 0, 0,
                                            tmp_path / "prompts")["inf"]
    ids, timings, bench = {}, {}, {}
    for enable in (True, False):
        with Server(tmp_path, model, enable) as srv:
            ready_s = srv.wait_ready()
            t_ready = time.time()
            # The API server, the engine core and 2 workers carry the marker (so the
            # leak check after stop() can see them).
            assert len(processes_with(srv.marker)) >= 4, processes_with(srv.marker)
            before = srv.stats_after(t_ready) if enable else {}
            ids[enable] = {"long": srv.complete(LONG_PROMPT),
                           "short": srv.complete(SHORT_PROMPT)}
            if enable:
                # Counters of the running server: each worker ran both modes during the
                # two requests (the long prefill sharded, the short one and every decode
                # step replicated).
                after = srv.stats_after(time.time())
                assert sorted(after) == [0, 1], after
                for rank, doc in after.items():
                    expected = expected_conversion("fp", doc)
                    assert doc["converted"] == expected["converted"], doc
                    assert doc["sp_threshold"] == SP_THRESHOLD, doc
                    moved = _delta(doc["stats"], before[rank]["stats"])
                    missing = missing_modes(moved, expected)
                    assert not missing, (rank, missing, moved)
            t0 = time.time()
            res = serve_bench.run_client(srv.port, model, prompts, math.inf, 0,
                                         served_name=SERVED_NAME)
            bench[srv.name] = (serve_bench.client_figures(res, 24), (t0, time.time()))
            stop_s = srv.stop()
            log = srv.log()
        timings[srv.name] = (round(ready_s, 1), round(stop_s, 1), len(srv.shm_removed))
        active = [line for line in log.splitlines() if ACTIVE in line]
        if enable:
            # vLLM prints the plugin's line once per worker, with its own prefix.
            assert len(active) == 2, log[-6000:]
            for rank in (0, 1):
                assert any(f"TP rank {rank}/2" in line and "INFO" in line for line in active), \
                    active
            for line in active:  # the settings of --additional-config took effect
                assert f"sp_threshold={SP_THRESHOLD} " in line and "transport shm" in line, line
            assert "refusing" not in log, log[-6000:]
        else:
            assert not active, active
            assert not srv.stats_files(), srv.stats_files()
    print(f"\nflashcomm serve: (ready s, stop s, vLLM shm segments removed) {timings}; ids "
          f"{ids[True]}", file=sys.stderr)
    assert ids[True] == ids[False], ids
    _check_bench_smoke(tmp_path, prompts, bench)


def _check_bench_smoke(tmp: Path, prompts: Path, bench: dict) -> None:
    """The serving benchmark's figures, trace and summary from the two servers."""
    rows = serve_bench.load_prompts(prompts)
    rec: dict = {"servers": []}
    for mode, (fig, window) in bench.items():
        assert fig["completed"] == BENCH_PROMPTS and fig["failed"] == 0, (mode, fig)
        # Greedy with EOS ignored: each request generated exactly its output length.
        assert fig["total_output_tokens"] == sum(r["output_tokens"] for r in rows), fig
        for key in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                    "output_throughput", "median_ttft_long_ms"):
            assert fig[key] is not None and fig[key] > 0, (mode, key, fig)
        steps = serve_bench.read_trace(tmp / f"trace_{mode}")
        assert sorted(steps) == [0, 1], sorted(steps)
        trace = serve_bench.trace_summary(steps[0], *window, SP_THRESHOLD)
        assert trace["steps"] >= max(r["output_tokens"] for r in rows), (mode, trace)
        assert trace["above"] >= 1, (mode, trace)  # the prefills, together
        if mode == "on":  # the counters: both modes, each step as the rule says
            assert trace["modes"].get("sharded") and trace["modes"].get("replicated"), trace
            assert trace["rule_mismatches"] == 0, trace
        else:
            assert set(trace["modes"]) == {"-"}, trace
        rec["servers"].append({"mode": mode, "runs": {"inf": fig},
                               "trace": {"summary": {"inf": trace}}})
    row = serve_bench.summarize(rec, ["inf"])["inf"]
    for key in ("median_ttft_ms", "median_tpot_ms", "output_throughput"):
        assert row[key]["ratio"] is not None and row[key]["ratio"] > 0, row[key]


def test_serve_help_reaches_vllm_cli():
    # The wrapper's usage, then vLLM's own `serve --help`: vLLM's CLI built its parser,
    # which with the CPU wheel fails unless the version lookup is answered.
    proc = subprocess.run(serve_command() + ["--help"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "usage: flashcomm serve MODEL" in proc.stdout, proc.stdout[:2000]
    assert "usage: vllm serve" in proc.stdout and "ParallelConfig" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bad_setting_fails_start_up_naming_the_key(tmp_path):
    """A bad value in --additional-config stops ``flashcomm serve`` in the API server
    process, before vLLM builds its configuration (the model directory is empty: nothing
    reads it) or starts an engine; a misspelt key is a warning naming the valid one."""
    model = tmp_path / "model"
    model.mkdir()
    env = vllm_env(tmp_path, True, 2, "eager", CPU_VIEW)
    env[MARKER] = uuid.uuid4().hex
    config = {"flashcomm": {"enable": True, "sp_threshold": "lots", "stats_fle": "x"}}
    t0 = time.time()
    proc = subprocess.run(serve_command() + [str(model), "--additional-config",
                                             json.dumps(config)],
                          capture_output=True, text=True, timeout=600, env=env,
                          start_new_session=True)
    seconds = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert ('flashcomm: additional_config["flashcomm"]["sp_threshold"] must be \'auto\' or '
            "an integer >= 0, got 'lots'") in out, out[-3000:]
    assert ("unknown key 'stats_fle' in additional_config[\"flashcomm\"] is ignored; did "
            "you mean 'stats_file'?") in out, out[-3000:]
    assert "Initializing a V1 LLM engine" not in out and "EngineCore" not in out, out[-3000:]
    assert not processes_with(env[MARKER])
    print(f"\nflashcomm serve with a bad setting exited after {seconds:.1f} s", file=sys.stderr)
