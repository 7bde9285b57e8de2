"""flashcomm's vLLM plugin against the real vLLM (CPU, tp=2 over gloo / SHM).

Each configuration runs ``vllm.LLM`` in its own subprocess (``python tests/test_vllm.py
run ...``; spawn-safe, keeps this process clean), once with ``FLASHCOMM_ENABLE=1`` and
once without, on a tiny checkpoint written by ``scripts/make_tiny_checkpoint.py``.
Greedy decoding of token-id prompts; ``FLASHCOMM_SP_THRESHOLD=16`` so the prefill of
3 prompts x 12 tokens (36 tokens) runs sharded and the decode steps (3 tokens) and a
one-prompt prefill of 8 tokens run replicated.

* Compilation: vLLM's default on CPU, Inductor (Qwen3 FP, Qwen3 W8A8), and the eager
  backend that ``VLLM_CPU_CI_ENV=1`` selects (the others; faster to start). Each asserts
  one compiled graph per worker, no recompilation, both modes counted in every worker.
* Tokens: float32 identical; bfloat16 identical except after a near-tie (vLLM's GEMMs
  and flashcomm's round differently in bf16; :func:`diverged_outside_ties`).
* W8A8 and the CPU model: vLLM's CPU int8 linear takes its AMX kernel when the CPU has
  AMX and the shapes fit (``check_cpu_sgl_kernel``), and that kernel accepts only
  bf16/fp16 activations; elsewhere it takes oneDNN, which accepts float32 too. So W8A8
  is served in bf16 (vLLM's serving dtype: runs on every CPU) and, for the float32
  test, vLLM is steered to the kernel it uses on CPUs without AMX when this CPU has AMX
  (:data:`CPU_VIEWS`), in both runs; flashcomm's own kernels still run at this CPU's ISA.
* ``FLASHCOMM_VLLM_TEST_CPU=avx2`` (or ``no-amx``) runs every engine and server of the
  vLLM tests as vLLM, torch, Inductor and oneDNN run on an AVX2-only x86 CPU (dispatch
  steered; the instructions stay available).
* Refusals: a MoE model through the engine; pipeline parallel, LoRA, vLLM's fusion pass
  and unknown architectures on real ``VllmConfig`` objects.

Skipped (with the reason) when vLLM is not importable: ``make install-vllm``
(``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SP_THRESHOLD = 16
BIG = [[(7 * i + 3 * j + 5) % 500 + 3 for j in range(12)] for i in range(3)]  # 36 tokens
SMALL = [[(11 * j + 1) % 500 + 3 for j in range(8)]]  # 8 tokens
MAX_TOKENS = 8
TOP_LOGPROBS = 2
BF16_TIE_NATS = 0.05
ENGINE_TIMEOUT_S = int(os.environ.get("FLASHCOMM_VLLM_TEST_TIMEOUT", "1200"))
REFUSAL = "flashcomm: refusing to enable flashcomm for this vLLM model"
ACTIVE = "flashcomm: active"  # flashcomm.vllm.plugin.ACTIVE_MARKER

# What flashcomm converts in the tiny checkpoints (make_tiny_checkpoint.py defaults), per
# weight kind and form of the converted layers (the worker reports the form as
# additional_config["flashcomm"]["gemm"]; none reported = "flashcomm"). "ops": groups of
# flashcomm ops; in every worker each group must have calls counted in both modes
# (replicated and sharded) while batches below and above SP_THRESHOLD run. "converted":
# modules with flashcomm state in the tiny model (TINY_LAYERS decoder layers).
TINY_LAYERS = 2
CONVERSION: dict[tuple[str, str], dict] = {
    # flashcomm computes: per layer 2 norms, qkv, o, gate_up, down; plus the final norm.
    ("fp", "flashcomm"): {"ops": (("sp_row_linear",), ("sp_column_linear",),
                                  ("sp_add_rms_norm",)),
                          "converted": 6 * TINY_LAYERS + 1},
    ("w8a8", "flashcomm"): {"ops": (("sp_row_linear_w8a8",), ("sp_column_linear_w8a8",),
                                    ("sp_add_rms_norm",)),
                            "converted": 6 * TINY_LAYERS + 1},
    # vLLM's GEMMs compute, flashcomm communicates: per layer 2 norms, o, down; final norm.
    ("fp", "engine"): {"ops": (("sp_reduce",), ("sp_add_rms_norm",)),
                       "converted": 4 * TINY_LAYERS + 1},
    ("w8a8", "engine"): {"ops": (("sp_reduce",), ("sp_add_rms_norm",)),
                         "converted": 4 * TINY_LAYERS + 1},
}
MODES = ("replicated", "sharded")

# CPU views: what vLLM, torch, Inductor and oneDNN are told about the CPU in an engine
# subprocess. Each name lists the torch.cpu probes answered False (vLLM's kernel
# choices and Inductor's vector ISA read them) and environment settings (ATen's and
# oneDNN's own dispatch). Dispatch is steered; the CPU's instructions stay available.
CPU_VIEWS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "": ((), {}),
    "no-amx": (("_is_amx_tile_supported", "_is_amx_fp16_supported"), {}),
    "avx2": (("_is_amx_tile_supported", "_is_amx_fp16_supported", "_is_avx512_supported",
              "_is_avx512_bf16_supported", "_is_vnni_supported"),
             {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
}
CPU_VIEW = os.environ.get("FLASHCOMM_VLLM_TEST_CPU", "")
if CPU_VIEW not in CPU_VIEWS:
    raise ValueError(f"FLASHCOMM_VLLM_TEST_CPU must be one of {sorted(CPU_VIEWS)}, "
                     f"got {CPU_VIEW!r}")


def _vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return (f"vLLM is not importable ({type(e).__name__}: {e}); install the extra: "
                f"make install-vllm")
    return None


_MISSING = _vllm_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


# ---------------------------------------------------------------------------------------
# Engine subprocess
# ---------------------------------------------------------------------------------------

def _plugin_shim(tmp: Path) -> str | None:
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


def _cpu_view_dir(tmp: Path, view: str) -> str | None:
    """A directory with a ``sitecustomize.py`` that applies ``CPU_VIEWS[view]``'s probe
    answers in every Python process started with it on PYTHONPATH (the engine or server,
    its engine core and workers); None for the real CPU."""
    probes, _ = CPU_VIEWS[view]
    if not probes:
        return None
    d = tmp / f"cpu_view_{view}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(
        f"# Written by tests/test_vllm.py: CPU view {view!r} (dispatch as on an x86 CPU\n"
        f"# without these features; the instructions stay available).\n"
        f"import torch.cpu\n\n"
        f"for _probe in {probes!r}:\n"
        f"    if hasattr(torch.cpu, _probe):\n"
        f"        setattr(torch.cpu, _probe, lambda: False)\n")
    return str(d)


def vllm_env(tmp: Path, enable: bool, tp: int, compile_backend: str = "eager",
             cpu_view: str = "") -> dict[str, str]:
    """Environment of a vLLM process (engine or server) with flashcomm on or off.
    ``compile_backend``: "inductor" (vLLM's default on CPU) or "eager"
    (``VLLM_CPU_CI_ENV=1``)."""
    if compile_backend not in ("inductor", "eager"):
        raise ValueError(f"compile_backend must be 'inductor' or 'eager', got "
                         f"{compile_backend!r}")
    env = dict(os.environ)
    paths = [str(ROOT / "python")]
    for extra in (_plugin_shim(tmp), _cpu_view_dir(tmp, cpu_view)):
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
        # Inductor's own caches: per test, never a stale kernel from another build.
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
               cpu_view: str = CPU_VIEW) -> tuple[dict | None, str]:
    """Runs ``vllm.LLM`` on ``model`` in a subprocess; (result, log), result None when
    it failed. ``logprobs``: also the top-2 log-probs of every generated position (a
    separate pass after the checked one)."""
    out = tmp / f"result_{model.name}_{'on' if enable else 'off'}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", str(model), str(out),
           "--tp", str(tp), "--dtype", dtype] + (["--bench"] if bench else []) + \
        (["--logprobs"] if logprobs else [])
    t0 = time.time()
    proc = subprocess.run(cmd, env=vllm_env(tmp, enable, tp, compile_backend, cpu_view),
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


# vLLM 0.32's CPU communicator creates these shared-memory segments and unlinks them only
# in a destructor that does not run when its processes end (with or without flashcomm).
VLLM_CPU_SHM_TAG = "-cpushm_"


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
    d = tmp / name
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(d),
                    "--dtype", "float32", *args], check=True, capture_output=True, text=True)
    return d


def vllm_int8_kernel_takes_float32(model: Path, tp: int = 2, cpu_view: str = CPU_VIEW) -> bool:
    """Whether vLLM's CPU W8A8 linear (CPUInt8ScaledMMLinearKernel), on this CPU as seen
    through ``cpu_view``, accepts float32 activations for every quantized layer of the
    tiny checkpoint ``model``: not when it picks its AMX kernel (x86, symmetric
    activations, ``check_cpu_sgl_kernel(N, K, int8)``), which takes bf16/fp16 only."""
    import platform
    import torch
    from vllm.model_executor.layers import utils as vllm_layer_utils

    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    cfg = json.loads((model / "config.json").read_text())
    acts = cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    if not acts.get("symmetric", True):
        return True
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    shapes = [((nh + 2 * nkv) * hd // tp, h), (h, nh * hd // tp), (2 * inter // tp, h),
              (h, inter // tp)]  # [N, K] per rank: qkv, o, gate_up, down
    probes = [name for name in CPU_VIEWS[cpu_view][0] if hasattr(torch.cpu, name)]
    saved = {name: getattr(torch.cpu, name) for name in probes}
    try:
        for name in probes:
            setattr(torch.cpu, name, lambda: False)
        return not any(vllm_layer_utils.check_cpu_sgl_kernel(n, k, torch.int8)
                       for n, k in shapes)
    finally:
        for name, fn in saved.items():
            setattr(torch.cpu, name, fn)


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------

def _sum_mode(stats: dict, mode: str, ops: tuple[str, ...]) -> int:
    return sum(stats.get(op, {}).get(mode, 0) for op in ops)


def expected_conversion(kind: str, worker: dict) -> dict:
    """``CONVERSION`` for weight ``kind`` in the form ``worker`` (a worker_stats() result
    or a stats-file document) reports."""
    form = (worker.get("flashcomm_config") or {}).get("gemm", "flashcomm")
    return CONVERSION[(kind, form)]


def missing_modes(stats: dict, expected: dict) -> list[str]:
    """The (op group, mode) pairs of ``expected["ops"]`` with no call counted in
    ``stats`` (one worker's ``flashcomm.stats()``)."""
    return [f"{'/'.join(ops)} {mode}" for ops in expected["ops"] for mode in MODES
            if _sum_mode(stats, mode, ops) == 0]


def diverged_outside_ties(on: dict, off: dict, tie_nats: float) -> list[str]:
    """Where greedy decoding with flashcomm on picked another token than off: each such
    sequence must, at its first differing position, have had a near-tie in the off run
    (the on run's token is the off run's second choice, within ``tie_nats`` of the
    first). Returns the violations (after a tie the sequences legitimately differ)."""
    bad = []
    for key in ("big", "small"):
        for i, (a, b) in enumerate(zip(on[f"ids_{key}"], off[f"ids_{key}"])):
            pos = next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if pos is None:
                continue
            top = off["logprobs"][key][i][pos]
            gap = top.get(str(b[pos]), 0.0) - top.get(str(a[pos]), float("-inf"))
            if not gap <= tie_nats:
                bad.append(f"{key}[{i}] position {pos}: on {a[pos]} off {b[pos]}, off-run "
                           f"top-2 {top} (gap {gap:.3g} > {tie_nats})")
    return bad


def check_on_off(tmp: Path, model: Path, kind: str, dtype: str = "float32",
                 tie_nats: float | None = None, compile_backend: str = "eager",
                 cpu_view: str = CPU_VIEW) -> tuple[dict, dict]:
    """vLLM with flashcomm off, then on, in the same environment. ``tie_nats=None``:
    greedy ids identical; else identical except after near-ties. ``kind``: "fp" or
    "w8a8" (CONVERSION)."""
    lp = tie_nats is not None
    runs = {}
    for enable in (False, True):
        res, log = run_engine(tmp, model, enable=enable, dtype=dtype, logprobs=lp,
                              compile_backend=compile_backend, cpu_view=cpu_view)
        assert res is not None, (f"vLLM run {'with' if enable else 'without'} flashcomm "
                                 f"failed ({dtype}, {compile_backend}, CPU view "
                                 f"{cpu_view or 'real'}):\n{log[-6000:]}")
        runs[enable] = res
    off, on = runs[False], runs[True]
    print(f"\n{model.name} {dtype} {compile_backend} (CPU view {cpu_view or 'real'}): off "
          f"{off['wall_s']} s, on {on['wall_s']} s", file=sys.stderr)

    # Nothing in shared memory outlives the engines but vLLM's own CPU segments.
    assert not off["shm_left"] and not on["shm_left"], (off["shm_left"], on["shm_left"])
    # Without the plugin enabled nothing is converted and no flashcomm op runs.
    for w in off["workers_after"]:
        assert w["converted"] == 0 and not any(sum(v.values()) for v in w["stats"].values())
    if tie_nats is None:
        assert on["ids_big"] == off["ids_big"], (on["ids_big"], off["ids_big"])
        assert on["ids_small"] == off["ids_small"], (on["ids_small"], off["ids_small"])
    else:
        bad = diverged_outside_ties(on, off, tie_nats)
        assert not bad, bad
        same = sum(a == b for k in ("big", "small")
                   for a, b in zip(on[f"ids_{k}"], off[f"ids_{k}"]))
        print(f"{model.name} {dtype}: {same}/{len(BIG) + len(SMALL)} sequences identical",
              file=sys.stderr)

    assert len(on["workers_after"]) == 2
    for before, after, plain in zip(on["workers_before"], on["workers_after"],
                                    off["workers_after"]):
        expected = expected_conversion(kind, after)
        assert after["converted"] == expected["converted"], after
        assert after["compile_backend"] == plain["compile_backend"] == compile_backend, \
            (after["compile_backend"], plain["compile_backend"])
        if compile_backend == "inductor":  # Inductor compiled the graph (torch's counters)
            compiled = [sum(w["inductor"].get(k, 0) for k in ("fxgraph_cache_miss",
                                                            "fxgraph_cache_hit"))
                        for w in (after, plain)]
            assert min(compiled) >= 1, (after["inductor"], plain["inductor"])
        # Replicated calls all-reduce through vLLM's own communicator (the default).
        assert after["all_reduce_provider"].startswith("vllm::all_reduce(tp"), after
        # Counted during the checked generate calls only: batches above and below
        # SP_THRESHOLD ran, so every op group ran in both modes in every worker.
        missing = missing_modes(after["stats"], expected)
        assert not missing, (missing, after["stats"])
        # No recompilation: the dynamo counters did not move while batches below and
        # above the threshold ran; one graph, with flashcomm on as off.
        assert after["dynamo"] == before["dynamo"], (before["dynamo"], after["dynamo"])
        graphs = after["dynamo"].get("stats", {}).get("unique_graphs")
        assert graphs == plain["dynamo"].get("stats", {}).get("unique_graphs") == 1, \
            (after["dynamo"], plain["dynamo"])
    assert on["ids_big_first"] == on["ids_big"]
    return off, on


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

def test_qwen3_fp_inductor_identical_tokens(tmp_path):
    # vLLM's default compilation on CPU (Inductor), as `vllm serve` runs it.
    model = make_checkpoint(tmp_path, "qwen3", "--arch", "qwen3")
    check_on_off(tmp_path, model, "fp", compile_backend="inductor")


def test_qwen3_w8a8_inductor_bf16_tokens(tmp_path):
    # W8A8 served in bf16, as vLLM serves it: vLLM's own int8 kernel as this CPU picks it
    # (AMX where present) runs in the baseline. Inductor, near-tie rule (bf16).
    model = make_checkpoint(tmp_path, "qwen3-w8a8", "--arch", "qwen3", "--w8a8", "--act",
                            "dynamic")
    check_on_off(tmp_path, model, "w8a8", dtype="bfloat16", tie_nats=BF16_TIE_NATS,
                 compile_backend="inductor")


def test_qwen2_qkv_bias_bf16_tokens(tmp_path):
    # bfloat16: flashcomm's kernels and vLLM's accumulate in different orders, so a few
    # outputs round to the neighbouring bf16 value. Tolerance: greedy ids identical
    # except where, in the run without flashcomm, the token flashcomm picked was the
    # runner-up within BF16_TIE_NATS of the top choice (a near-tie); after such a
    # position the sequences may legitimately differ.
    model = make_checkpoint(tmp_path, "qwen2", "--arch", "qwen2")
    check_on_off(tmp_path, model, "fp", dtype="bfloat16", tie_nats=BF16_TIE_NATS)


def test_llama_w8a8_static_fp32_identical_tokens(tmp_path):
    # Llama (no qkv bias, no q/k norm) with static per-tensor activation scales: the
    # fused layers' per-shard input scales are merged the way vLLM's kernel merges them.
    # float32: where vLLM's int8 kernel on this CPU takes bf16/fp16 only (AMX), both runs
    # see the CPU without AMX, so vLLM's baseline takes the oneDNN kernel it runs on such
    # CPUs; flashcomm's own kernels run at this CPU's ISA either way.
    model = make_checkpoint(tmp_path, "llama-w8a8-static", "--arch", "llama", "--w8a8",
                            "--act", "static")
    view = CPU_VIEW
    if not vllm_int8_kernel_takes_float32(model, cpu_view=view):
        view = "no-amx"
        assert vllm_int8_kernel_takes_float32(model, cpu_view=view)
    print(f"\nllama W8A8 float32: CPU view {view or 'real'}", file=sys.stderr)
    check_on_off(tmp_path, model, "w8a8", cpu_view=view)


def test_mistral_fp_identical_tokens(tmp_path):
    # vLLM builds Mistral with its own classes (MistralForCausalLM / MistralDecoderLayer).
    model = make_checkpoint(tmp_path, "mistral", "--arch", "mistral")
    check_on_off(tmp_path, model, "fp")


def _vllm_config(model: Path, **kwargs):
    from vllm.config import ModelConfig, VllmConfig
    mc = ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="float32")
    return VllmConfig(model_config=mc, **kwargs)


def _unsupported(name: str) -> tuple[dict, str]:
    """A real VllmConfig option that flashcomm must refuse, and the reason it names."""
    from vllm.config import CompilationConfig, LoRAConfig, ParallelConfig, PassConfig
    return {
        "pipeline_parallel": ({"parallel_config": ParallelConfig(pipeline_parallel_size=2)},
                              "pipeline parallelism is not supported"),
        "lora": ({"lora_config": LoRAConfig()}, "LoRA is not supported"),
        "fuse_allreduce_rms": ({"compilation_config": CompilationConfig(
            pass_config=PassConfig(fuse_allreduce_rms=True))},
            "compilation pass fuse_allreduce_rms is on"),
    }[name]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_supported_config_is_accepted(tmp_path, arch):
    from flashcomm.vllm.layers import check_config
    check_config(_vllm_config(make_checkpoint(tmp_path, arch, "--arch", arch)))


@pytest.mark.parametrize("option", ["pipeline_parallel", "lora", "fuse_allreduce_rms"])
def test_unsupported_config_is_refused(tmp_path, option):
    # Checked in every worker before the model is built (the engine-level path is the
    # MoE test below); the same check on vLLM's own config objects here.
    from flashcomm.vllm.layers import FlashcommUnsupportedError, check_config
    kwargs, reason = _unsupported(option)
    cfg = _vllm_config(make_checkpoint(tmp_path, "llama", "--arch", "llama"), **kwargs)
    with pytest.raises(FlashcommUnsupportedError) as e:
        check_config(cfg)
    assert REFUSAL in str(e.value) and reason in str(e.value), str(e.value)
    assert "unset FLASHCOMM_ENABLE" in str(e.value)


def test_unknown_architecture_is_refused(tmp_path):
    from flashcomm.vllm.layers import FlashcommUnsupportedError, check_config
    base = make_checkpoint(tmp_path, "gemma-like", "--arch", "llama")
    cfg = _vllm_config(base)
    cfg.model_config.hf_config.architectures = ["GemmaForCausalLM"]
    with pytest.raises(FlashcommUnsupportedError, match="GemmaForCausalLM"):
        check_config(cfg)


def test_moe_model_is_refused(tmp_path):
    base = make_checkpoint(tmp_path, "moe", "--arch", "qwen3")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True})
    (base / "config.json").write_text(json.dumps(cfg))
    res, log = run_engine(tmp_path, base, enable=True, tp=1)
    assert res is None, "flashcomm accepted a MoE model"
    assert REFUSAL in log, log[-6000:]
    assert "Qwen3MoeForCausalLM" in log and "unset FLASHCOMM_ENABLE" in log, log[-6000:]
    # The plugin logs the reason through vLLM's logger at ERROR (besides the traceback).
    assert any(" ERROR " in line and REFUSAL in line and "UnsupportedError" not in line
               for line in log.splitlines()), log[-6000:]


# ---------------------------------------------------------------------------------------
# The engine subprocess
# ---------------------------------------------------------------------------------------

def _engine_main(argv: list[str]) -> None:
    import argparse
    import statistics
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--logprobs", action="store_true",
                   help=f"then a pass with the top-{TOP_LOGPROBS} log-probs")
    a = p.parse_args(argv)
    from vllm import LLM, SamplingParams
    from flashcomm.vllm.plugin import worker_reset_stats, worker_stats

    llm = LLM(model=a.model, tensor_parallel_size=a.tp, skip_tokenizer_init=True,
              dtype=a.dtype, enforce_eager=False, max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=512, seed=0, enable_prefix_caching=False)
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
    res = {"ids_small": gen(SMALL), "ids_big": gen(BIG), "ids_big_first": first,
           "workers_before": before}
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
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        _engine_main(sys.argv[2:])
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))
