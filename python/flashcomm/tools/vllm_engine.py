"""Runs ``vllm.LLM`` with flashcomm on or off in a subprocess, as the vLLM tests and
``benchmarks/vllm_bench.py`` do, and reports what it generated and counted.

:func:`run_engine` starts ``python .../flashcomm/tools/vllm_engine.py MODEL OUT ...`` (one
engine per process: spawn-safe, and the caller stays free of vLLM's process-global
state) in the environment :func:`vllm_env` builds. It runs this file by its path, not
with ``-m``, so that the engine's processes (which re-import the main module) load
flashcomm only where a user's vLLM does: through the plugin, and here through
``worker_stats``. The engine generates greedily from
token-id prompts: :data:`BIG` (3 x 12 = 36 tokens, above :data:`SP_THRESHOLD`: its
prefill runs sharded) and :data:`SMALL` (8 tokens, replicated, as every decode step),
and collects each worker's :func:`flashcomm.vllm.plugin.worker_stats` before and after.

* :data:`CPU_VIEWS`: what vLLM, torch, Inductor and oneDNN are told about the CPU in
  the engine's processes (dispatch steered through a generated ``sitecustomize.py``
  and environment settings; the CPU's instructions stay available).
* :func:`make_checkpoint`: a tiny checkpoint from ``scripts/make_tiny_checkpoint.py``
  (source tree only), so nothing is downloaded.
* Shared memory: vLLM 0.32's CPU communicator leaves its segments behind when its
  processes end (with or without flashcomm); :func:`remove_left_shm` removes those and
  returns any other leftover for the caller to report.

Importing this module imports no vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from flashcomm.tools.cpu_view import VIEWS, sitecustomize_dir

# The folder that holds the flashcomm package (the source tree's python/, or
# site-packages): on the engine's PYTHONPATH.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
# The source tree (for scripts/make_tiny_checkpoint.py), when running from one.
SOURCE_ROOT = PACKAGE_PARENT.parent

SP_THRESHOLD = 16
BIG = [[(7 * i + 3 * j + 5) % 500 + 3 for j in range(12)] for i in range(3)]  # 36 tokens
SMALL = [[(11 * j + 1) % 500 + 3 for j in range(8)]]  # 8 tokens
MAX_TOKENS = 8
TOP_LOGPROBS = 2
# The mode-invariance pass (``--invariance``): a long prompt served together with two
# short ones, then each alone, greedy with the top-INVARIANCE_LOGPROBS log-probs.
MIXED = [[(5 * j + 2) % 500 + 3 for j in range(40)], [(3 * j + 9) % 500 + 3 for j in range(5)],
         [(17 * j + 4) % 500 + 3 for j in range(7)]]
INVARIANCE_LOGPROBS = 5
ENGINE_TIMEOUT_S = int(os.environ.get("FLASHCOMM_VLLM_TEST_TIMEOUT", "1200"))
COMPILE_BACKENDS = ("inductor", "eager")

# CPU views (flashcomm.tools.cpu_view): each name's torch.cpu probes answered False (vLLM's
# kernel choices and Inductor's vector ISA read them) and environment settings (ATen's,
# oneDNN's and flashcomm's own dispatch).
CPU_VIEWS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    name: (view.hidden, view.env()) for name, view in VIEWS.items()}
ENV_CPU_VIEW = "FLASHCOMM_VLLM_TEST_CPU"

# vLLM 0.32's CPU communicator creates these shared-memory segments and unlinks them only
# in a destructor that does not run when its processes end (with or without flashcomm).
VLLM_CPU_SHM_TAG = "-cpushm_"


def cpu_view_from_env() -> str:
    """The CPU view ``FLASHCOMM_VLLM_TEST_CPU`` asks for ('' = the real CPU)."""
    view = os.environ.get(ENV_CPU_VIEW, "")
    if view not in CPU_VIEWS:
        raise ValueError(f"{ENV_CPU_VIEW} must be one of {sorted(CPU_VIEWS)}, got {view!r}")
    return view


def _plugin_shim(tmp: Path) -> Optional[str]:
    """A dist-info declaring the entry point, when the installed flashcomm does not
    (running from a source tree); harmless otherwise (register() is idempotent)."""
    from importlib.metadata import entry_points
    if any(ep.value.startswith("flashcomm.vllm") for ep in
           entry_points(group="vllm.general_plugins")):
        return None
    d = tmp / "ep" / "flashcomm_vllm_plugin_shim-0.0.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: flashcomm-vllm-plugin-shim\n"
                                "Version: 0.0\n")
    (d / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nflashcomm = flashcomm.vllm.plugin:register\n")
    return str(tmp / "ep")


def vllm_env(tmp: Path, enable: bool, tp: int, compile_backend: str = "eager",
             cpu_view: str = "") -> dict[str, str]:
    """Environment of a vLLM process (engine or server) with flashcomm on or off, its
    caches under ``tmp``. ``compile_backend``: "inductor" (vLLM's default on CPU) or
    "eager" (``VLLM_CPU_CI_ENV=1``)."""
    if compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got "
                         f"{compile_backend!r}")
    env = dict(os.environ)
    paths = [str(PACKAGE_PARENT)]
    for extra in (_plugin_shim(tmp), sitecustomize_dir(tmp, cpu_view)):
        if extra:
            paths.append(extra)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % (os.cpu_count() or 1))
                                              for i in range(tp)) if tp > 1 else "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_DISABLE_COMPILE_CACHE": "1",
        # Inductor's own caches: per run, never a stale kernel from another build.
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor_cache"),
        # collective_rpc with a function (flashcomm.vllm.plugin.worker_stats) pickles it
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),
        "FLASHCOMM_SP_THRESHOLD": str(SP_THRESHOLD),
    })
    env.update(CPU_VIEWS[cpu_view][1])
    env.pop("VLLM_CPU_CI_ENV", None)
    if compile_backend == "eager":
        env["VLLM_CPU_CI_ENV"] = "1"  # vLLM's CPU platform: dynamo + the eager backend
    env["FLASHCOMM_ENABLE"] = "1" if enable else "0"
    return env


def run_engine(tmp: Path, model: Path, enable: bool, tp: int = 2, dtype: str = "float32",
               bench: bool = False, logprobs: bool = False, compile_backend: str = "eager",
               cpu_view: Optional[str] = None, invariance: bool = False,
               env: Optional[dict[str, str]] = None, tag: str = "",
               switch_thresholds: tuple[int, ...] = ()) -> tuple[Optional[dict], str]:
    """Runs ``vllm.LLM`` on ``model`` in a subprocess; returns (result, log), the result
    None when it failed. ``logprobs``: also the top-2 log-probs of every generated
    position (a separate pass after the checked one). ``bench``: also prefill and decode
    timings. ``cpu_view``: a key of :data:`CPU_VIEWS` (None: from the environment).
    ``invariance``: also :data:`MIXED` served as one batch and each prompt alone, with
    ids and top-5 log-probs (``res["invariance"]``). ``env``: set over :func:`vllm_env`
    (e.g. ``FLASHCOMM_SP_THRESHOLD``); ``tag`` names this run's result and log files.
    ``switch_thresholds``: the model runs uncompiled, and per threshold every worker
    switches to it before the invariance pass (``res["switched"][str(T)]``), so one
    engine serves the same requests in several modes."""
    view = cpu_view_from_env() if cpu_view is None else cpu_view
    out = tmp / f"result_{model.name}_{'on' if enable else 'off'}{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(model), str(out), "--tp", str(tp),
           "--dtype", dtype] + (["--bench"] if bench else []) + \
        (["--logprobs"] if logprobs else []) + (["--invariance"] if invariance else []) + \
        (["--switch-thresholds", ",".join(map(str, switch_thresholds))]
         if switch_thresholds else [])
    run_env = vllm_env(tmp, enable, tp, compile_backend, view)
    run_env.update(env or {})
    t0 = time.time()
    proc = subprocess.run(cmd, env=run_env,
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
                          cwd=str(tmp))
    log = proc.stdout + proc.stderr
    (tmp / (out.stem + ".log")).write_text(log)
    if proc.returncode != 0 or not out.exists():
        return None, log
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.time() - t0, 1)
    res["shm_removed"], res["shm_left"] = remove_left_shm(res["shm_mapped"])
    return res, log


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def shm_mapped_by(pids: list[int]) -> list[str]:
    """The /dev/shm files the processes ``pids`` have mapped."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(None, 5)[5] if len(line.split(None, 5)) == 6 else ""
            if path.startswith("/dev/shm/"):
                found.add(path.removesuffix(" (deleted)"))
    return sorted(found)


def remove_left_shm(paths: list[str]) -> tuple[list[str], list[str]]:
    """Of ``paths`` (mapped by vLLM processes that have ended), those still present:
    (vLLM's CPU communicator segments, now removed; any other, left for the caller)."""
    vllm_cpu, other = [], []
    for path in paths:
        if os.path.exists(path):
            if VLLM_CPU_SHM_TAG in os.path.basename(path):
                os.unlink(path)
                vllm_cpu.append(path)
            else:
                other.append(path)
    return vllm_cpu, other


def make_checkpoint(tmp: Path, name: str, *args: str) -> Path:
    """``scripts/make_tiny_checkpoint.py tmp/name --dtype float32 ARGS`` (a float32 tiny
    checkpoint; ARGS e.g. ``--arch qwen3 --w8a8``); returns its folder."""
    script = SOURCE_ROOT / "scripts" / "make_tiny_checkpoint.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: tiny checkpoints are made from a "
                                f"flashcomm source tree")
    d = tmp / name
    subprocess.run([sys.executable, str(script), str(d), "--dtype", "float32", *args],
                   check=True, capture_output=True, text=True)
    return d


def worker_set_sp_threshold(worker, sp_threshold: int) -> int:
    """For ``LLM.collective_rpc(worker_set_sp_threshold, args=(T,))``: every converted
    module of this worker's model switches to ``sp_threshold`` T, and the ranks agree on it
    again (``flashcomm.init``: a collective, every worker runs it). Read per forward only
    when vLLM runs the model uncompiled (``--switch-thresholds``: compilation mode NONE);
    a compiled graph holds the threshold it was traced with. Returns the modules changed."""
    import dataclasses

    import flashcomm
    changed, agreed = 0, set()
    for mod in worker.model_runner.get_model().modules():
        st = getattr(mod, "_fc_state", None)
        if st is None:
            continue
        mod._fc_state = dataclasses.replace(st, sp_threshold=int(sp_threshold))
        changed += 1
        if st.group_name not in agreed:
            agreed.add(st.group_name)
            flashcomm.init(st.group_name, sp_threshold=int(sp_threshold),
                           threshold=int(st.threshold), enabled=True)
    return changed


def _engine_main(argv: list[str]) -> None:
    """The engine subprocess: generate, count, write the result JSON to OUT."""
    p = argparse.ArgumentParser(prog="vllm_engine.py")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--logprobs", action="store_true",
                   help=f"then a pass with the top-{TOP_LOGPROBS} log-probs")
    p.add_argument("--invariance", action="store_true",
                   help="then MIXED as one batch and each prompt alone, with log-probs")
    p.add_argument("--switch-thresholds", default="",
                   help="T1,T2,...: the model uncompiled; per T, every worker switched to "
                        "sp_threshold T, then the checked pass with log-probs and the "
                        "invariance pass (res['switched'][T])")
    a = p.parse_args(argv)
    switch = [int(t) for t in a.switch_thresholds.split(",") if t]
    from vllm import LLM, SamplingParams

    from flashcomm.vllm.plugin import worker_reset_stats, worker_stats

    llm = LLM(model=a.model, tensor_parallel_size=a.tp, skip_tokenizer_init=True,
              dtype=a.dtype, enforce_eager=False, max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=512, seed=0, enable_prefix_caching=False,
              **({"compilation_config": {"mode": 0}} if switch else {}))
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                        detokenize=False)
    logprobs: dict[str, list] = {}

    def gen(prompts, params=sp, key=None):
        outs = llm.generate([{"prompt_token_ids": t} for t in prompts], params,
                            use_tqdm=False)
        if key:
            logprobs[key] = [[{str(t): lp.logprob for t, lp in pos.items()}
                              for pos in (o.outputs[0].logprobs or [])] for o in outs]
        return [list(o.outputs[0].token_ids) for o in outs]

    first = gen(BIG)  # warm: the graph is compiled by now
    llm.collective_rpc(worker_reset_stats)
    before = llm.collective_rpc(worker_stats)
    res: dict[str, Any] = {"ids_small": gen(SMALL), "ids_big": gen(BIG),
                           "ids_big_first": first, "workers_before": before}
    res["workers_after"] = llm.collective_rpc(worker_stats)
    if a.logprobs:
        # After the checked pass (log-probs make vLLM trace a second graph): the same
        # greedy ids again, with the top-2 log-probs of every generated position; where
        # two runs pick different tokens they tell whether the position was a near-tie.
        lp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            detokenize=False, logprobs=TOP_LOGPROBS)
        for key, prompts in (("small", SMALL), ("big", BIG)):
            again = gen(prompts, lp, key=key)
            if again != res[f"ids_{key}"]:
                raise RuntimeError(f"greedy ids changed when log-probs were requested: "
                                   f"{again} vs {res[f'ids_{key}']}")
        res["logprobs"] = logprobs
    def invariance_pass() -> dict[str, Any]:
        # The same requests batched together and alone: per request, greedy ids and the
        # top-5 log-probs of every generated position (exact floats).
        lp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            detokenize=False, logprobs=INVARIANCE_LOGPROBS)
        inv: dict[str, Any] = {}
        inv["ids_mixed"] = gen(MIXED, lp, key="inv_mixed")
        inv["logprobs_mixed"] = logprobs.pop("inv_mixed")
        inv["ids_alone"], inv["logprobs_alone"] = [], []
        for prompt in MIXED:
            inv["ids_alone"] += gen([prompt], lp, key="inv_alone")
            inv["logprobs_alone"] += logprobs.pop("inv_alone")
        # BIG and SMALL as one batch each, with the same log-probs.
        for key, prompts in (("big", BIG), ("small", SMALL)):
            inv[f"ids_{key}"] = gen(prompts, lp, key=f"inv_{key}")
            inv[f"logprobs_{key}"] = logprobs.pop(f"inv_{key}")
        return inv

    if a.invariance:
        res["invariance"] = invariance_pass()
    if switch:
        res["switched"] = {}
        for t in switch:
            changed = llm.collective_rpc(worker_set_sp_threshold, args=(t,))
            llm.collective_rpc(worker_reset_stats)
            inv = invariance_pass()
            inv["converted_switched"] = changed
            inv["workers_after"] = llm.collective_rpc(worker_stats)
            res["switched"][str(t)] = inv
    if a.bench:
        long = [[(13 * i + 7 * j) % 500 + 3 for j in range(100)] for i in range(4)]  # 400
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        many = SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True,
                              detokenize=False)
        pre, dec = [], []
        for _ in range(5):
            t = time.perf_counter()
            gen(long, one)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            gen(long, many)
            t33 = time.perf_counter() - t
            pre.append(t1 * 1e3)
            dec.append((t33 - t1) / 32 * 1e3)
        res["prefill_ms_400tok"] = round(statistics.median(pre), 2)
        res["decode_ms_per_step_4seq"] = round(statistics.median(dec), 2)
    # Shared memory the engine's processes use; run_engine checks what is left after exit.
    res["shm_mapped"] = shm_mapped_by([os.getpid(), *descendants(os.getpid())])
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    _engine_main(sys.argv[1:])
