"""One-GPU check of flashcomm, step by step (run by scripts/gpu_check.sh).

The group has one rank. With FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1 every op takes the
path it would take at tp > 1 (strategy pipelined iff n > threshold, mode sharded iff
n > sp_threshold, collectives on the one-rank group, agreement check), so NCCL, the
stream overlap and CUDA-graph capture of collectives run on one GPU. At tp = 1 a
rank owns every row, so every output row is checked against the dense reference.

Steps (subcommands), each its own process so that one step's timeout or crash
cannot hide another's result; each writes ``<out>/<step>.json``:

  env            torch / CUDA / NCCL versions, the device, the CUDA toolkit (root, any
                 libnvrtc*), CMake
  probe          the library loads, and the forced collective paths are taken
  checks         every op against the dense reference (FP; W8A8 in every
                 quantisation mode with m = 1..16 and >= 17), path checked per call
  opcheck        torch.library.opcheck of every op, both paths
  graphs         CUDA-graph capture + replay of every op (cpu: eager re-run instead)
  compile        torch.compile of the tiny DecoderModel: one graph for all n
  bench-gemm     int8 vs bf16 GEMM, chunked-GEMM efficiency, W8A8 linear at m = 1/16/64
  bench-overlap  pipelined vs sequential ops with forced collectives
  report         merges the step JSONs (and run.json, the shell's step table) into
                 gpu_check.json + gpu_check.txt
  bitwise-modes  FLASHCOMM_BITWISE_MODES: every sp_* op sharded == replicated, bitwise

The build is CMake's (scripts/gpu_check.sh); this script never compiles.
GPU_CHECK_DEBUG_HANG=<step>: that step sleeps instead of running (the rehearsal of a hang:
the shell's deadline and TERM trap must still write the report).

``--device cpu`` runs the same code on CPU over gloo (the dry run): CUDA events
become wall-clock timers, CUDA-graph capture becomes an eager re-run.

Exit status: 0 passed; 1 failed; 3 failed only because calls ran the one-rank path
where the forced tp > 1 path was expected (FLASHCOMM_DEBUG_FORCE_COLLECTIVES not honoured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent

# Thresholds of the checks: both sides are crossed with small token counts.
THRESHOLD = 32
SP_THRESHOLD = 32
TOKENS = [1, 7, 16, 17, 32, 33, 100, 257]
# W8A8: m <= 16 takes the exact float64 fallback on CUDA (torch._int_mm needs m > 16).
W8A8_ROWS = list(range(1, 17)) + [17, 32, 33, 100, 257]
W8A8_MODES = ["dynamic", "static", "static_asym", "int8_static", "int8_per_token"]
K, N, H = 256, 128, 256  # K % 8 == 0 and N % 8 == 0: CUDA's int8 GEMM applies for m > 16
EPS = 1e-6
# max|got - want| / max|want| against the float64 reference, per output dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Compiled DecoderModel (TINY) vs the dense model: max |logit difference| (logits O(1..10)).
MODEL_ATOL = {False: 0.25, True: 0.5}  # by w8a8

FORCED_BANNER = (
    "FORCED COLLECTIVES NOT IN EFFECT: FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1 is set, but at "
    "tp = 1 {count} call(s) ran the one-rank path instead of the tp > 1 one (e.g. {detail}). "
    "The library in use ({lib}) does not honour the setting (if the probe step failed the "
    "same way), or these ops ignore it. The collective paths (NCCL, pipelined overlap, graph "
    "capture of collectives) were NOT exercised by those calls; the numerical results "
    "above are still valid.")
# The one-rank path an op takes when the forced setting has no effect.
ONE_RANK_PATH = {"pipelined": "sequential", "sharded": "replicated"}


# --- shared helpers --------------------------------------------------------------------

def forced() -> bool:
    return os.environ.get("FLASHCOMM_DEBUG_FORCE_COLLECTIVES", "0") not in ("", "0")


def expected_strategy(n: int, threshold: int) -> str:
    """Strategy of a compact op at tp = 1: as at tp > 1 when collectives are forced."""
    return "pipelined" if forced() and n > threshold else "sequential"


def expected_mode(n: int, sp_threshold: int, enabled: bool = True) -> str:
    """Layout mode of a layout-invariant op at tp = 1 (see expected_strategy)."""
    return "sharded" if forced() and enabled and n > sp_threshold else "replicated"


def library_path() -> str:
    from flashcomm import _loader
    return str(_loader.library_path())


# init_process_group's timeout (NCCL's default is 10 minutes, the GPU machine's whole
# command limit): a stuck collective fails the step instead of eating the lease.
PG_TIMEOUT_S = float(os.environ.get("GPU_CHECK_PG_TIMEOUT_S", "90"))
# Where the file stores go (not the log directory that is returned): --store-dir.
STORE_DIR: Path | None = None


def init_group(device: str, out: Path, step: str) -> str:
    """One-rank default group (NCCL on CUDA, gloo on CPU) over a file store, so no port
    is needed. Returns its group_name."""
    import datetime

    import torch.distributed as dist

    store_dir = STORE_DIR or out
    store_dir.mkdir(parents=True, exist_ok=True)
    store_file = store_dir / f".store.{step}.{os.getpid()}"
    store_file.unlink(missing_ok=True)
    kwargs: dict[str, Any] = {}
    if device == "cuda":
        torch.cuda.set_device(0)
        kwargs["device_id"] = torch.device("cuda", 0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"file://{store_file}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S), **kwargs)
    return dist.group.WORLD.group_name


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def max_abs_rel(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max|got - want|, that / max|want|) in float64; NaN anywhere counts as inf."""
    if got.numel() == 0:
        return 0.0, 0.0
    diff = (got.double().cpu() - want.double().cpu()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-12)
    if math.isnan(diff):
        return math.inf, math.inf
    return diff, diff / scale


@dataclass
class StepResult:
    """Outcome of one step: failures (numerical, errors), path failures (forced
    collectives not honoured), figures for the JSON."""

    step: str
    device: str
    failures: list[str] = field(default_factory=list)
    path_failures: list[str] = field(default_factory=list)
    unforced_paths: int = 0  # path failures that are the one-rank path
    data: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAIL {what}", flush=True)

    def check_path(self, op: str, counts: dict[str, int], want: str, what: str) -> bool:
        """One call of `op` must have taken path `want` (flashcomm.stats() of that call)."""
        if counts.get(want, 0) >= 1 and sum(counts.values()) == counts.get(want, 0):
            return True
        self.path_failures.append(f"{what}: expected path '{want}', stats say {counts}")
        one_rank = ONE_RANK_PATH.get(want)
        if one_rank is not None and counts.get(want, 0) == 0 and counts.get(one_rank, 0) >= 1:
            self.unforced_paths += 1
        print(f"  PATH {what}: expected '{want}', stats say {counts}", flush=True)
        return False

    def finish(self, out: Path) -> int:
        self.data.update({"step": self.step, "device": self.device, "forced": forced(),
                          "seconds": round(time.perf_counter() - self.started, 1),
                          "failures": self.failures, "path_failures": self.path_failures})
        (out / f"{self.step}.json").write_text(json.dumps(self.data, indent=1, default=str))
        if self.failures:
            print(f"\n{self.step}: {len(self.failures)} failure(s):")
            for f in self.failures[:40]:
                print(f"  - {f}")
        if self.path_failures:
            print(f"\n{self.step}: {len(self.path_failures)} call(s) took the wrong path, e.g. "
                  f"{self.path_failures[0]}")
        if self.unforced_paths:
            print("\n" + FORCED_BANNER.format(count=self.unforced_paths,
                                              detail=self.path_failures[0], lib=library_path()))
        if self.failures or len(self.path_failures) > self.unforced_paths:
            return 1
        if self.path_failures:
            return 3
        print(f"\n{self.step}: passed ({self.data['seconds']} s)")
        return 0


def run_guarded(result: StepResult, what: str, fn: Callable[[], Any]) -> Any:
    """Runs fn; an exception becomes a failure of `what` (with its traceback)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - every error is reported, the step goes on
        tb = traceback.format_exc(limit=4)
        result.fail(f"{what}: {tb.strip().splitlines()[-1]}")
        print(tb, flush=True)
        return None


# --- op cases ----------------------------------------------------------------------------

@dataclass
class Case:
    """One op call: `call()` runs it on fixed inputs, `reference()` gives the expected
    output(s) in float64 on the host, `path` the expected flashcomm.stats() entry."""

    op: str
    label: str
    call: Callable[[], Any]
    reference: Callable[[], Any]
    path: str
    rtol: float
    inputs: list[torch.Tensor]  # tensors a CUDA graph reads (refilled before replay)
    args: tuple = ()  # for opcheck: the torch.ops overload's positional arguments
    counter: str = ""  # flashcomm.stats() key when it is not `op` (in-place forms)


def _gen(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, seed: int, device: str, dtype: torch.dtype, scale: float = 1.0):
    return (torch.randn(*shape, generator=_gen(seed, device), device=device) * scale).to(dtype)


def fp_cases(gname: str, device: str, dtype: torch.dtype, n: int) -> list[Case]:
    """FP ops at n tokens (tp = 1: x [n, K], weight [N, K], compact = full layout)."""
    from flashcomm.tools.models import add_rms_norm

    ops = torch.ops.flashcomm
    x = _randn((n, K), 10 + n, device, dtype)
    w = _randn((N, K), 11, device, dtype, K ** -0.5)
    b = _randn((N,), 12, device, dtype)
    dense = lambda: x.double().cpu() @ w.double().cpu().t() + b.double().cpu()  # noqa: E731
    strat, mode = expected_strategy(n, THRESHOLD), expected_mode(n, SP_THRESHOLD)
    tol = RTOL[dtype]
    cases = []
    args = (x, w, b, gname, THRESHOLD, True)
    name = dtype_name(dtype)
    cases.append(Case("gemm_rs", f"{name} n={n}", lambda a=args: ops.gemm_rs(*a), dense, strat,
                      tol, [x], args))
    for gather in (False, True):
        args = (x, w, b, gname, n, THRESHOLD, True, gather)
        cases.append(Case("ag_gemm", f"{name} n={n} gather_output={gather}",
                          lambda a=args: ops.ag_gemm(*a), dense, strat, tol, [x], args))
    args = (x, w, b, gname, SP_THRESHOLD, True, THRESHOLD)
    cases.append(Case("sp_row_linear", f"{name} n={n}", lambda a=args: ops.sp_row_linear(*a),
                      dense, mode, tol, [x], args))
    for gather in (False, True):
        args = (x, w, b, gname, SP_THRESHOLD, True, THRESHOLD, gather)
        cases.append(Case("sp_column_linear", f"{name} n={n} gather_output={gather}",
                          lambda a=args: ops.sp_column_linear(*a), dense, mode, tol, [x], args))
    h = _randn((n, H), 13 + n, device, dtype)
    r = _randn((n, H), 14 + n, device, dtype)
    g = (1.0 + 0.1 * _randn((H,), 15, device, torch.float32)).to(dtype)
    for residual in (None, r):
        for gather in (False, True):
            args = (h, residual, g, EPS, gname, SP_THRESHOLD, True, gather)

            def ref(residual=residual):
                normed, summed = add_rms_norm(h.cpu(), None if residual is None else
                                              residual.cpu(), g.cpu(), EPS)
                return normed.double(), summed.double()

            cases.append(Case("sp_add_rms_norm",
                              f"{name} n={n} residual={residual is not None} gather={gather}",
                              lambda a=args: ops.sp_add_rms_norm(*a), ref, mode, tol,
                              [h] + ([] if residual is None else [residual]), args))
    # Newer ops, checked when the library has them: the engine-GEMM reduction and the
    # row gather (tp = 1: the owned rows are all rows, so both return their input).
    for op in ("sp_reduce", "sp_gather"):
        if hasattr(ops, op):
            p = _randn((n, N), 16 + n, device, dtype)
            args = (p, gname, SP_THRESHOLD, True)
            cases.append(Case(op, f"{name} n={n}", lambda a=args, op=op: getattr(ops, op)(*a),
                              lambda p=p: p.double().cpu(), mode, tol, [p], args))
    cases += inplace_cases(gname, device, dtype, n, mode, tol)
    return cases


def inplace_cases(gname: str, device: str, dtype: torch.dtype, n: int, mode: str,
                  tol: float) -> list[Case]:
    """The in-place forms. Each call first copies pristine sources into work buffers
    (captured in a CUDA graph too), so a call can be repeated and the sources refilled;
    opcheck gets the work buffers themselves."""
    from flashcomm.tools.models import add_rms_norm

    ops = torch.ops.flashcomm
    cases = []
    h = _randn((n, H), 17 + n, device, dtype)
    r = _randn((n, H), 18 + n, device, dtype)
    g = (1.0 + 0.1 * _randn((H,), 19, device, torch.float32)).to(dtype)
    h_work, r_work = torch.empty_like(h), torch.empty_like(r)
    for gather in (False, True):
        args = (h_work, r_work, g, EPS, gname, SP_THRESHOLD, True, gather)

        def norm_call(a=args):
            h_work.copy_(h)
            r_work.copy_(r)
            ops.sp_add_rms_norm_(*a)
            return h_work.clone(), r_work.clone()

        def norm_ref():
            normed, summed = add_rms_norm(h.cpu(), r.cpu(), g.cpu(), EPS)
            return normed.double(), summed.double()

        cases.append(Case("sp_add_rms_norm_", f"{dtype_name(dtype)} n={n} gather={gather}",
                          norm_call, norm_ref, mode, tol, [h, r], args, "sp_add_rms_norm"))
    p = _randn((n, N), 20 + n, device, dtype)
    p_work = torch.empty_like(p)
    args = (p_work, gname, SP_THRESHOLD, True)

    def reduce_call(a=args):
        p_work.copy_(p)
        ops.sp_reduce_(*a)
        return p_work.clone()

    cases.append(Case("sp_reduce_", f"{dtype_name(dtype)} n={n}", reduce_call,
                      lambda: p.double().cpu(), mode, tol, [p], args, "sp_reduce"))
    gather_args = (p_work, gname, SP_THRESHOLD, True)

    def gather_call(a=gather_args):
        p_work.copy_(p)
        ops.sp_gather_(*a)
        return p_work.clone()

    cases.append(Case("sp_gather_", f"{dtype_name(dtype)} n={n}", gather_call,
                      lambda: p.double().cpu(), mode, tol, [p], gather_args, "sp_gather"))
    return cases


def w8a8_inputs(mode: str, m: int, device: str, dtype: torch.dtype):
    """x [m, K] and (input_scale, input_zero_point) for one quantisation mode."""
    from flashcomm.tools.reference import quantize_dynamic

    x = _randn((m, K), 20 + m, device, torch.float32).to(dtype)
    scale = zp = None
    if mode in ("static", "static_asym", "int8_static"):
        scale = torch.tensor([4.0 / 127.0], device=device)
    if mode == "static_asym":
        zp = torch.tensor([5], dtype=torch.int32, device=device)
    if mode == "int8_static":
        x = torch.randint(-128, 128, (m, K), generator=_gen(21 + m, device), device=device,
                          dtype=torch.int8)
    if mode == "int8_per_token":
        x, scale = quantize_dynamic(x)
    return x, scale, zp


def w8a8_cases(gname: str, device: str, mode: str, m: int,
               out_dtype: torch.dtype) -> list[Case]:
    """The four W8A8 ops at m tokens in one quantisation mode."""
    from flashcomm.tools.reference import quantize_weight_per_channel, w8a8_linear

    ops = torch.ops.flashcomm
    x, scale, zp = w8a8_inputs(mode, m, device, torch.bfloat16)
    w_q, w_s = quantize_weight_per_channel(_randn((N, K), 22, device, torch.float32))
    b = _randn((N,), 23, device, torch.float32)

    def ref():
        return w8a8_linear(x.cpu(), w_q.cpu(), w_s.cpu(), None if scale is None else scale.cpu(),
                           None if zp is None else zp.cpu(), b.cpu()).double()

    strat, sp = expected_strategy(m, THRESHOLD), expected_mode(m, SP_THRESHOLD)
    tol = RTOL[out_dtype]
    label = f"{mode} m={m} out={dtype_name(out_dtype)}"
    ins = [x] + ([scale] if mode == "int8_per_token" else [])
    cases = []
    args = (x, w_q, w_s, scale, zp, b, gname, out_dtype, THRESHOLD, True)
    cases.append(Case("gemm_rs_w8a8", label, lambda a=args: ops.gemm_rs_w8a8(*a), ref, strat,
                      tol, ins, args))
    args = (x, w_q, w_s, scale, zp, b, gname, m, out_dtype, THRESHOLD, True, m % 2 == 1)
    cases.append(Case("ag_gemm_w8a8", label + f" gather_output={m % 2 == 1}",
                      lambda a=args: ops.ag_gemm_w8a8(*a), ref, strat, tol, ins, args))
    args = (x, w_q, w_s, scale, zp, b, gname, out_dtype, SP_THRESHOLD, True, THRESHOLD)
    cases.append(Case("sp_row_linear_w8a8", label, lambda a=args: ops.sp_row_linear_w8a8(*a),
                      ref, sp, tol, ins, args))
    args = (x, w_q, w_s, scale, zp, b, gname, out_dtype, SP_THRESHOLD, True, THRESHOLD,
            m % 2 == 0)
    cases.append(Case("sp_column_linear_w8a8", label + f" gather_output={m % 2 == 0}",
                      lambda a=args: ops.sp_column_linear_w8a8(*a), ref, sp, tol, ins, args))
    return cases


def run_case(result: StepResult, case: Case, record: dict[str, list]) -> None:
    """Runs one case: path from the counters, max differences against the reference."""
    import flashcomm

    def body():
        flashcomm.reset_stats()
        got = case.call()
        counts = flashcomm.stats().get(case.counter or case.op, {})
        got = got if isinstance(got, tuple) else (got,)
        want = case.reference()
        want = want if isinstance(want, tuple) else (want,)
        worst_abs = worst_rel = 0.0
        for g, w in zip(got, want):
            if tuple(g.shape) != tuple(w.shape):
                raise AssertionError(f"shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            a, r = max_abs_rel(g, w)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        path_ok = result.check_path(case.op, counts, case.path, f"{case.op} {case.label}")
        ok = worst_rel <= case.rtol
        print(f"  {'ok  ' if ok else 'FAIL'} {case.op:<22} {case.label:<48} path "
              f"{case.path:<10}{'' if path_ok else '(NOT TAKEN)'} max|d| {worst_abs:.2e} "
              f"rel {worst_rel:.2e}", flush=True)
        rec = record.setdefault(case.op, [0, 0.0, 0.0])
        rec[0] += 1
        rec[1], rec[2] = max(rec[1], worst_abs), max(rec[2], worst_rel)
        if not ok:
            result.failures.append(f"{case.op} {case.label}: rel {worst_rel:.3g} > {case.rtol}")

    run_guarded(result, f"{case.op} {case.label}", body)


# --- steps ---------------------------------------------------------------------------

def cuda_toolkit() -> dict[str, Any]:
    """The CUDA toolkit CMake is pointed at (scripts/gpu_check.sh exports CUDA_PATH and puts
    its bin/ first on PATH) and any libnvrtc* in it: torch's CMake config needs the former,
    and a toolkit without nvrtc is fine for flashcomm (it links torch's target)."""
    root, how = os.environ.get("CUDA_PATH"), "CUDA_PATH"
    if not root and os.environ.get("CUDA_HOME"):
        root, how = os.environ["CUDA_HOME"], "CUDA_HOME"
    if not root and Path("/usr/local/cuda/bin/nvcc").exists():
        root, how = "/usr/local/cuda", "default location"
    if not root and (nvcc := shutil.which("nvcc")):
        root, how = str(Path(nvcc).resolve().parent.parent), "the nvcc on PATH"
    info: dict[str, Any] = {"cuda_toolkit": f"{root} ({how})" if root else "none"}
    if root:
        if not (Path(root) / "include/cuda_runtime.h").exists():
            info["cuda_toolkit"] += ": no include/cuda_runtime.h there"
        found = sorted({str(p) for pattern in ("lib/libnvrtc*", "lib64/libnvrtc*",
                                               "targets/*/lib/libnvrtc*")
                        for p in Path(root).glob(pattern)})
        info["libnvrtc"] = ", ".join(found) or "none in the toolkit"
    info["nvcc_on_path"] = shutil.which("nvcc") or "none"
    return info


def step_env(args) -> int:
    result = StepResult("env", args.device)
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda,
                            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "host": platform.node(), "cpus": os.cpu_count()}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            result.fail(f"torch {torch.__version__} sees no CUDA device")
        else:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            props = torch.cuda.get_device_properties(0)
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["sms"] = props.multi_processor_count
            try:
                info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception as e:  # noqa: BLE001
                result.fail(f"NCCL version unavailable: {e}")
            import torch.distributed as dist
            if not dist.is_nccl_available():
                result.fail("torch.distributed has no NCCL backend")
    else:
        info["gpu"] = "none (dry run on CPU)"
    for tool, flag in (("nvidia-smi", "--query-gpu=name,driver_version,memory.total"),
                       ("nvcc", "--version"), ("cmake", "--version"), ("ninja", "--version"),
                       ("g++", "--version")):
        exe = shutil.which(tool)
        if exe is None:
            info[tool] = "not found"
            continue
        cmd = [exe] + ([flag, "--format=csv,noheader"] if tool == "nvidia-smi" else [flag])
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
            lines = [line for line in text.strip().splitlines() if line]
            info[tool] = lines[-1] if tool == "nvcc" else lines[0]  # nvcc: "Build cuda_..."
        except Exception as e:  # noqa: BLE001
            info[tool] = f"failed: {e}"
    info.update(cuda_toolkit())
    try:
        info["flashcomm_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10).stdout.strip() or "unknown (no git checkout)"
    except Exception:  # noqa: BLE001
        info["flashcomm_commit"] = "unknown"
    for k, v in info.items():
        print(f"  {k:<16} {v}")
    result.data["env"] = info
    return result.finish(args.out)


def step_probe(args) -> int:
    """Loads the library and runs two calls above the thresholds: with forced
    collectives they must take the tp > 1 paths (pipelined, sharded)."""
    result = StepResult("probe", args.device)
    import flashcomm

    setting = os.environ.get("FLASHCOMM_DEBUG_FORCE_COLLECTIVES")
    print(f"  library {library_path()}  flashcomm {flashcomm.__version__}  "
          f"FLASHCOMM_DEBUG_FORCE_COLLECTIVES={setting}")
    gname = init_group(args.device, args.out, "probe")
    dtype = torch.bfloat16
    n = THRESHOLD + 1
    for case in fp_cases(gname, args.device, dtype, n):
        if case.op in ("gemm_rs", "sp_row_linear"):
            run_case(result, case, {})
    try:
        result.data["transport"] = str(torch.ops.flashcomm.transport(gname))
        print(f"  transport of the group: {result.data['transport']}")
    except Exception:  # noqa: BLE001 - older builds have no transport query
        pass
    return result.finish(args.out)


def step_checks(args) -> int:
    result = StepResult("checks", args.device)
    gname = init_group(args.device, args.out, "checks")
    record: dict[str, list] = {}
    print(f"== FP ops vs float64 dense reference (threshold {THRESHOLD}, sp_threshold "
          f"{SP_THRESHOLD}, K={K} N={N} H={H})", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        for n in TOKENS:
            for case in fp_cases(gname, args.device, dtype, n):
                run_case(result, case, record)
    print("== W8A8 ops vs the dense W8A8 reference (every quantisation mode, m = 1..16 and "
          ">= 17)", flush=True)
    for mode in W8A8_MODES:
        for m in W8A8_ROWS:
            for out_dtype in ((torch.bfloat16, torch.float32) if m in (1, 16, 17, 100)
                              else (torch.bfloat16,)):
                for case in w8a8_cases(gname, args.device, mode, m, out_dtype):
                    run_case(result, case, record)
    check_coverage(result, {*record})
    print("\n  op                      calls  max|d|     max rel")
    for op, (calls, worst_abs, worst_rel) in sorted(record.items()):
        print(f"  {op:<22}{calls:>7}  {worst_abs:.2e}   {worst_rel:.2e}")
    result.data["per_op"] = {op: {"calls": c, "max_abs": a, "max_rel": r}
                             for op, (c, a, r) in record.items()}
    return result.finish(args.out)


def check_coverage(result: StepResult, covered: set[str]) -> None:
    """Every registered op that takes a group must have a case here."""
    group_ops = set()
    try:  # private API: skip the coverage check if it moves
        for name in torch._C._dispatch_get_all_op_names():
            if name.startswith("flashcomm::"):
                op = name.split("::", 1)[1].split(".")[0]
                schema = str(getattr(torch.ops.flashcomm, op).default._schema)
                if "str group_name" in schema and "Tensor" in schema.split("->")[0]:
                    group_ops.add(op)
    except Exception as e:  # noqa: BLE001
        print(f"  (op coverage not checked: {e})")
        return
    missing = sorted(group_ops - covered)
    if missing:
        result.fail(f"ops without a GPU check case: {missing} (add them to gpu_check.py)")


def opcheck_cases(gname: str, device: str) -> list[Case]:
    cases = []
    for n in (1, THRESHOLD + 1):  # both paths
        for dtype in (torch.bfloat16,):
            cases += fp_cases(gname, device, dtype, n)
        for mode in ("dynamic", "static_asym", "int8_per_token"):
            cases += w8a8_cases(gname, device, mode, n, torch.bfloat16)
    return cases


def step_opcheck(args) -> int:
    result = StepResult("opcheck", args.device)
    gname = init_group(args.device, args.out, "opcheck")
    seen: dict[str, int] = {}
    for case in opcheck_cases(gname, args.device):
        overload = getattr(torch.ops.flashcomm, case.op).default

        def body(case=case, overload=overload):
            report = torch.library.opcheck(overload, case.args)
            bad = {k: v for k, v in report.items() if v != "SUCCESS"}
            if bad:
                raise AssertionError(f"opcheck: {bad}")
            seen[case.op] = seen.get(case.op, 0) + 1
            print(f"  ok   opcheck {case.op:<22} {case.label}", flush=True)

        run_guarded(result, f"opcheck {case.op} {case.label}", body)
    check_coverage(result, set(seen))
    result.data["samples_per_op"] = seen
    return result.finish(args.out)


def step_graphs(args) -> int:
    """CUDA: capture each op (both paths) in a CUDA graph after flashcomm.init (the
    agreement check must not run inside a capture), refill the inputs, replay, compare
    with eager on the new inputs. CPU: the same closures re-run eagerly."""
    import flashcomm

    result = StepResult("graphs", args.device)
    gname = init_group(args.device, args.out, "graphs")
    flashcomm.init(gname, sp_threshold=SP_THRESHOLD, threshold=THRESHOLD, enabled=True,
                   device=args.device)
    if args.device != "cuda":
        print("  (cpu: CUDA-graph capture skipped; each closure runs eagerly twice, the second "
              "time on refilled inputs, and is compared with a fresh eager call)")
    cases = []
    for n in (16, THRESHOLD + 1, 257):
        cases += fp_cases(gname, args.device, torch.bfloat16, n)
        for mode in ("dynamic", "static_asym", "int8_per_token"):
            cases += w8a8_cases(gname, args.device, mode, n, torch.bfloat16)
    refills = iter(range(1000, 10 ** 6))  # a fresh seed per refill: inputs always change
    for case in cases:
        def body(case=case):
            eager = as_tuple(case.call())  # also the warm-up on the current stream
            if args.device == "cuda":
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        case.call()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                flashcomm.reset_stats()
                with torch.cuda.graph(graph):
                    static_out = as_tuple(case.call())
                # the capture ran the host code
                counts = flashcomm.stats().get(case.counter or case.op, {})
                graph.replay()  # capture records only: the first replay computes
                torch.cuda.synchronize()
            else:
                flashcomm.reset_stats()
                static_out = as_tuple(case.call())
                counts = flashcomm.stats().get(case.counter or case.op, {})
            first = tuple(t.clone() for t in static_out)
            for t in case.inputs:  # new data in the captured input buffers
                seed = next(refills)
                if t.dtype == torch.int8:
                    t.copy_(torch.randint(-128, 128, t.shape, generator=_gen(seed, t.device.type),
                                          device=t.device, dtype=torch.int8))
                elif t.dim() == 2 and t.shape[1] == 1:  # per-token scales stay positive
                    t.copy_((_randn(t.shape, seed, t.device.type, t.dtype).abs() + 0.5) *
                            t.abs().mean())
                else:
                    t.copy_(_randn(t.shape, seed, t.device.type, t.dtype))
            if args.device == "cuda":
                graph.replay()
                torch.cuda.synchronize()
                replayed = static_out
            else:
                replayed = as_tuple(case.call())
            fresh = as_tuple(case.call())
            worst_first = worst_replay = 0.0
            for e, f0, r, f in zip(eager, first, replayed, fresh):
                worst_first = max(worst_first, max_abs_rel(f0, e)[1])
                worst_replay = max(worst_replay, max_abs_rel(r, f)[1])
            if worst_first > case.rtol:
                raise AssertionError(f"first replay differs from eager on the same inputs: "
                                     f"rel {worst_first:.3g}")
            if worst_replay > case.rtol:
                raise AssertionError(f"replay differs from eager on the refilled inputs: rel "
                                     f"{worst_replay:.3g}")
            if all(torch.equal(r, f0) for r, f0 in zip(replayed, first)):
                raise AssertionError("replay did not read the refilled inputs")
            path_ok = result.check_path(case.op, counts, case.path,
                                        f"graph {case.op} {case.label}")
            print(f"  ok   {'graph' if args.device == 'cuda' else 'rerun'} {case.op:<22} "
                  f"{case.label:<40} path {case.path}{'' if path_ok else ' (NOT TAKEN)'} "
                  f"rel vs eager {worst_first:.1e} / {worst_replay:.1e}", flush=True)

        run_guarded(result, f"graph {case.op} {case.label}", body)
    run_guarded(result, "capture refusal", lambda: check_capture_refusal(args.device))
    return result.finish(args.out)


def check_capture_refusal(device: str) -> None:
    """An op on a group whose ranks have not agreed yet must refuse to run inside a
    capture, naming flashcomm.init (the agreement takes a host synchronisation). CUDA:
    a real capture; CPU: the library's capture hook for tests, where present."""
    import torch.distributed as dist

    if not forced():
        print("  (capture refusal not checked: a one-rank group without forced collectives "
              "needs no agreement)")
        return
    fresh = dist.new_group([0])  # a group no op has used yet
    x = _randn((8, K), 5, device, torch.bfloat16)
    w = _randn((N, K), 6, device, torch.bfloat16)

    def call():
        torch.ops.flashcomm.gemm_rs(x, w, None, fresh.group_name, THRESHOLD, True)

    try:
        if device == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                call()
        else:
            hook = getattr(torch.ops.flashcomm_testing, "set_capturing", None)
            if hook is None:
                print("  (capture refusal not checked on cpu: no capture hook in this library)")
                return
            hook(True)
            try:
                call()
            finally:
                hook(False)
    except RuntimeError as e:
        if "flashcomm.init" not in str(e):
            raise AssertionError(f"capture refused, but the message does not name "
                                 f"flashcomm.init: {e}") from e
        print(f"  ok   capture refusal on a group without agreement: "
              f"{str(e).splitlines()[0][:120]}...", flush=True)
        return
    raise AssertionError("an op ran inside a capture on a group whose ranks had not agreed "
                         "(expected a refusal naming flashcomm.init)")


def step_compile(args) -> int:
    """torch.compile (inductor, fullgraph, dynamic token dim) of the tiny DecoderModel in
    flashcomm mode, FP and W8A8: one graph for token counts on both sides of
    sp_threshold, logits close to the dense model, the mode per n from the counters."""
    import flashcomm
    from flashcomm.tools.models import TINY, build_model
    from torch._dynamo.testing import CompileCounterWithBackend

    result = StepResult("compile", args.device)
    init_group(args.device, args.out, "compile")
    dtype = torch.bfloat16
    # Starts at n >= 2: inductor specialises 0/1 of a backed dim (see tests/test_models.py).
    sequence = [7, SP_THRESHOLD, SP_THRESHOLD + 1, 100, 257, SP_THRESHOLD, 3, 2, 129]
    norms = 2 * TINY.num_layers + 1
    result.data["models"] = {}
    for w8a8 in (False, True):
        name = "w8a8" if w8a8 else "fp"

        def body(w8a8=w8a8, name=name):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            kwargs = dict(w8a8=w8a8, dtype=dtype, sp_threshold=SP_THRESHOLD, threshold=THRESHOLD)
            flash = build_model(TINY, "flashcomm", group=None, **kwargs).to(args.device)
            # The dense reference runs on the CPU: its W8A8 GEMM is torch._int_mm, which
            # on CUDA refuses m <= 16 rows.
            dense = build_model(TINY, "dense", **kwargs)
            counter = CompileCounterWithBackend(args.backend)
            compiled = torch.compile(flash, backend=counter, fullgraph=True, dynamic=True)
            rows = []
            t0 = time.perf_counter()
            with torch.no_grad():
                for n in sequence:
                    ids = torch.randint(0, TINY.vocab_size, (n,), device=args.device,
                                        generator=_gen(n, args.device))
                    torch._dynamo.mark_dynamic(ids, 0)
                    flashcomm.reset_stats()
                    got = compiled(ids)
                    if not rows:
                        frames_after_first = counter.frame_count
                    modes = flashcomm.stats().get("sp_add_rms_norm", {})
                    diff = (got.float().cpu() - dense(ids.cpu()).float()).abs().max().item()
                    want_mode = expected_mode(n, SP_THRESHOLD)
                    path_ok = result.check_path("sp_add_rms_norm", modes, want_mode,
                                                f"compiled {name} model n={n}")
                    if sum(modes.values()) != norms:  # every boundary norm ran once
                        result.failures.append(f"compiled {name} model n={n}: {modes} norm "
                                               f"calls, expected {norms}")
                    rows.append({"n": n, "max_abs_logit_diff": diff, "modes": modes,
                                 "finite": bool(torch.isfinite(got).all())})
                    ok = diff <= MODEL_ATOL[w8a8] and rows[-1]["finite"]
                    print(f"  {'ok  ' if ok else 'FAIL'} compiled {name} model n={n:<4} "
                          f"max|dlogit| {diff:.3g} mode {want_mode}"
                          f"{'' if path_ok else ' (NOT TAKEN: ' + str(modes) + ')'}", flush=True)
                    if not ok:
                        result.failures.append(f"compiled {name} model n={n}: max|dlogit| "
                                               f"{diff:.3g} > {MODEL_ATOL[w8a8]} or non-finite")
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            recompiles = counter.frame_count - frames_after_first
            seconds = time.perf_counter() - t0
            print(f"  {name} model: {graphs} graph(s), {recompiles} recompilation(s) after the "
                  f"first call, for n = {sequence} ({seconds:.1f} s incl. compile)", flush=True)
            if graphs != 1 or recompiles != 0:
                result.failures.append(f"compiled {name} model: {graphs} graphs, {recompiles} "
                                       "recompilations; expected one graph for every n")
            result.data["models"][name] = {"frames": counter.frame_count, "graphs": graphs,
                                           "recompiles": recompiles, "seconds": seconds,
                                           "rows": rows}

        run_guarded(result, f"compile {name} model", body)
    return result.finish(args.out)


# --- benchmarks (figures, never pass/fail on speed) ----------------------------------

class Timer:
    """Median milliseconds of fn(): CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: str, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        synchronize(self.device)
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def bench_sizes(args) -> tuple[list[int], list[int]]:
    if args.device != "cuda":
        return [64, 128], [256]  # dry run: the code path, not figures
    tokens = [1024, 2048, 4096, 8192, 16384]
    return tokens, [4096, 8192]


def step_bench_gemm(args) -> int:
    """int8 (torch._int_mm) vs bf16 GEMM and chunked-GEMM efficiency (one GEMM vs k
    row-chunk GEMMs, as the pipelined path splits it), then the W8A8 linear
    (gemm_rs_w8a8 at tp = 1, no forced collectives: quantise + GEMM + dequantise) at
    m = 1, 16, 64 against the bf16 linear."""
    from flashcomm.tools.reference import quantize_dynamic, quantize_weight_per_channel

    result = StepResult("bench-gemm", args.device)
    gname = init_group(args.device, args.out, "bench-gemm")
    timer = Timer(args.device, args.warmup, args.repeats)
    tokens, hiddens = bench_sizes(args)
    dev = args.device
    rows, linear_rows = [], []
    print(f"== GEMM [n, H] x [H, H]^T, median of {args.repeats} after {args.warmup} warm-up "
          f"({'CUDA events' if dev == 'cuda' else 'wall clock, dry run'})", flush=True)
    for hidden in hiddens:
        w = _randn((hidden, hidden), 1, dev, torch.bfloat16, hidden ** -0.5)
        w_q, w_s = quantize_weight_per_channel(w)
        w_qT = w_q.t()  # [K, N] column-major: the layout torch._int_mm wants
        for n in tokens:
            def one(n=n, hidden=hidden, w=w, w_q=w_q, w_s=w_s, w_qT=w_qT):
                x = _randn((n, hidden), 2, dev, torch.bfloat16)
                q, _ = quantize_dynamic(x)
                out = torch.empty(n, hidden, device=dev, dtype=torch.bfloat16)
                r: dict[str, Any] = {"H": hidden, "n": n}
                r["bf16_ms"] = timer(lambda: torch.mm(x, w.t(), out=out))
                r["int8_ms"] = timer(lambda: torch._int_mm(q, w_qT))
                r["w8a8_op_ms"] = timer(lambda: torch.ops.flashcomm.gemm_rs_w8a8(
                    x, w_q, w_s, None, None, None, gname, torch.bfloat16, 1 << 30, True))
                flops = 2.0 * n * hidden * hidden
                r["bf16_tflops"] = flops / r["bf16_ms"] / 1e9
                r["int8_tops"] = flops / r["int8_ms"] / 1e9
                r["int8_speedup"] = r["bf16_ms"] / r["int8_ms"]
                r["w8a8_op_speedup"] = r["bf16_ms"] / r["w8a8_op_ms"]
                for chunks in (2, 4, 8):
                    bounds = [n * i // chunks for i in range(chunks + 1)]

                    def chunked(bounds=bounds):
                        for lo, hi in zip(bounds, bounds[1:]):
                            torch.mm(x[lo:hi], w.t(), out=out[lo:hi])

                    r[f"chunks{chunks}_eff"] = r["bf16_ms"] / timer(chunked)
                rows.append(r)
                print(f"  H={hidden:<5} n={n:<6} bf16 {r['bf16_ms']:8.3f} ms "
                      f"({r['bf16_tflops']:6.1f} TFLOP/s)  int8 {r['int8_ms']:8.3f} ms "
                      f"({r['int8_tops']:6.1f} TOP/s) x{r['int8_speedup']:.2f}  w8a8 op "
                      f"x{r['w8a8_op_speedup']:.2f}  chunk eff 2/4/8 {r['chunks2_eff']:.2f}/"
                      f"{r['chunks4_eff']:.2f}/{r['chunks8_eff']:.2f}", flush=True)

            run_guarded(result, f"GEMM H={hidden} n={n}", one)
        print(f"== W8A8 linear (gemm_rs_w8a8, tp = 1) vs bf16 linear, H={hidden}", flush=True)
        for m in (1, 16, 64):
            def lin(m=m, hidden=hidden, w=w, w_q=w_q, w_s=w_s, w_qT=w_qT):
                x = _randn((m, hidden), 3, dev, torch.bfloat16)
                q, s = quantize_dynamic(x)
                s_static = torch.tensor([4.0 / 127.0], device=dev)
                op = torch.ops.flashcomm.gemm_rs_w8a8
                big = 1 << 30
                r: dict[str, Any] = {"H": hidden, "m": m}
                r["bf16_ms"] = timer(lambda: torch.nn.functional.linear(x, w))
                r["dynamic_ms"] = timer(lambda: op(x, w_q, w_s, None, None, None, gname,
                                                   torch.bfloat16, big, True))
                r["static_ms"] = timer(lambda: op(x, w_q, w_s, s_static, None, None, gname,
                                                  torch.bfloat16, big, True))
                r["int8_x_ms"] = timer(lambda: op(q, w_q, w_s, s, None, None, gname,
                                                  torch.bfloat16, big, True))
                # torch._int_mm itself needs m > 16 on CUDA; the op falls back below that.
                r["int_mm_ms"] = timer(lambda: torch._int_mm(q, w_qT)) \
                    if (m > 16 or dev != "cuda") else None
                linear_rows.append(r)
                int_mm = f"{r['int_mm_ms']:.4f}" if r["int_mm_ms"] is not None else "n/a"
                print(f"  m={m:<3} bf16 {r['bf16_ms']:.4f} ms  w8a8 dynamic "
                      f"{r['dynamic_ms']:.4f}  static {r['static_ms']:.4f}  int8 x "
                      f"{r['int8_x_ms']:.4f}  (torch._int_mm {int_mm})", flush=True)

            run_guarded(result, f"W8A8 linear H={hidden} m={m}", lin)
    result.data.update({"gemm": rows, "w8a8_linear": linear_rows,
                        "timing": "cuda events" if dev == "cuda" else "wall clock (dry run)",
                        "repeats": args.repeats, "warmup": args.warmup})
    return result.finish(args.out)


def step_bench_overlap(args) -> int:
    """Pipelined vs sequential gemm_rs / ag_gemm with forced collectives at tp = 1:
    the same GEMM and collective, run back to back (sequential) or chunked with the
    collectives overlapping the next chunk's GEMM (pipelined). Also the plain GEMM
    and the collective alone, for the ideal: max(gemm, collective)."""
    import flashcomm
    import torch.distributed as dist

    result = StepResult("bench-overlap", args.device)
    gname = init_group(args.device, args.out, "bench-overlap")
    group = dist.group.WORLD
    # torch >= 2.12 names; 2.11 (the GPU image) has only the older ones.
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    timer = Timer(args.device, args.warmup, args.repeats)
    tokens, hiddens = bench_sizes(args)
    dev = args.device
    big = 1 << 30
    rows = []
    print(f"== pipelined vs sequential, forced collectives (tp = 1), median of "
          f"{args.repeats}; pipeline config {flashcomm.get_pipeline_config()}", flush=True)
    for hidden in hiddens:
        w = _randn((hidden, hidden), 1, dev, torch.bfloat16, hidden ** -0.5)
        for n in tokens:
            def one(n=n, hidden=hidden, w=w):
                x = _randn((n, hidden), 2, dev, torch.bfloat16)
                out = torch.empty(n, hidden, device=dev, dtype=torch.bfloat16)
                r: dict[str, Any] = {"H": hidden, "n": n}
                r["gemm_ms"] = timer(lambda: torch.mm(x, w.t(), out=out))
                r["reduce_scatter_ms"] = timer(lambda: reduce_scatter(out, x, group=group))
                r["all_gather_ms"] = timer(lambda: all_gather(out, x, group=group))
                for op, call in (
                        ("gemm_rs", lambda t: flashcomm.gemm_rs(x, w, None, gname, t, True)),
                        ("ag_gemm", lambda t: flashcomm.ag_gemm(x, w, None, gname, n, t, True))):
                    for strategy, t in (("sequential", big), ("pipelined", 0)):
                        flashcomm.reset_stats()
                        call(t)
                        ran = {k for k, v in flashcomm.stats().get(op, {}).items() if v}
                        want = expected_strategy(n, t)
                        result.check_path(op, flashcomm.stats().get(op, {}), want,
                                          f"bench {op} {strategy} H={hidden} n={n}")
                        r[f"{op}_{strategy}_ms"] = timer(lambda: call(t))
                        r[f"{op}_{strategy}_ran"] = "+".join(sorted(ran))
                    comm = r["reduce_scatter_ms" if op == "gemm_rs" else "all_gather_ms"]
                    r[f"{op}_speedup"] = r[f"{op}_sequential_ms"] / r[f"{op}_pipelined_ms"]
                    # Share of the shorter phase hidden by the overlap (1 = perfect).
                    hidden_ms = r[f"{op}_sequential_ms"] - r[f"{op}_pipelined_ms"]
                    r[f"{op}_overlap_eff"] = hidden_ms / max(min(r["gemm_ms"], comm), 1e-9)
                rows.append(r)
                print(f"  H={hidden:<5} n={n:<6} gemm {r['gemm_ms']:.3f} RS "
                      f"{r['reduce_scatter_ms']:.3f} AG {r['all_gather_ms']:.3f} | gemm_rs seq "
                      f"{r['gemm_rs_sequential_ms']:.3f} pipe {r['gemm_rs_pipelined_ms']:.3f} "
                      f"(x{r['gemm_rs_speedup']:.2f}) | ag_gemm seq "
                      f"{r['ag_gemm_sequential_ms']:.3f} pipe {r['ag_gemm_pipelined_ms']:.3f} "
                      f"(x{r['ag_gemm_speedup']:.2f})", flush=True)

            run_guarded(result, f"overlap H={hidden} n={n}", one)
    result.data.update({"overlap": rows, "repeats": args.repeats, "warmup": args.warmup,
                        "pipeline_config": flashcomm.get_pipeline_config(),
                        "timing": "cuda events" if dev == "cuda" else "wall clock (dry run)"})
    return result.finish(args.out)


def step_report(args) -> int:
    """gpu_check.json (every step's JSON) and gpu_check.txt (the tables)."""
    merged: dict[str, Any] = {}
    order = ["run", *STEPS, "probe-fallback"]
    for path in sorted(args.out.glob("*.json"),
                       key=lambda p: order.index(p.stem) if p.stem in order else len(order)):
        if path.name != "gpu_check.json":
            merged[path.stem] = json.loads(path.read_text())
    (args.out / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))
    lines = []
    env = merged.get("env", {}).get("env", {})
    lines.append(f"{env.get('gpu', '?')}: torch {env.get('torch', torch.__version__)} "
                 f"CUDA {env.get('torch_cuda', torch.version.cuda)} NCCL {env.get('nccl', '-')}")
    run = merged.get("run", {})
    if run:  # the shell's table: every step, timed-out, killed and skipped ones included
        lines.append(f"{run.get('mode')}: {run.get('verdict')} after {run.get('seconds')} s "
                     f"(deadline {run.get('deadline_s')} s)")
        lines += [f"  {r['step']:<14} {r['seconds']:>5} s  {r['verdict']}"
                  for r in run.get("steps", [])]
    for step, data in merged.items():
        if isinstance(data, dict) and "seconds" in data and not run:
            state = "FAILED" if data["failures"] else (
                "FAILED (forced paths not taken)" if data["path_failures"] else "passed")
            lines.append(f"  {step:<14} {state:<32} {data['seconds']:>7.1f} s")
    gemm = merged.get("bench-gemm", {})
    if gemm.get("gemm"):
        lines.append(f"\nGEMM ({gemm['timing']}): int8/bf16 = bf16 ms / int8 ms; w8a8 op = "
                     "gemm_rs_w8a8 at tp=1 (quantise + int8 GEMM + dequantise) over bf16; "
                     "eff k = one GEMM / k row-chunk GEMMs")
        lines.append(f"{'H':>6}{'n':>7}{'bf16 ms':>10}{'TFLOP/s':>9}{'int8 ms':>10}"
                     f"{'int8/bf16':>10}{'w8a8 op':>9}{'eff 2':>7}{'eff 4':>7}{'eff 8':>7}")
        for r in gemm["gemm"]:
            lines.append(f"{r['H']:>6}{r['n']:>7}{r['bf16_ms']:>10.3f}{r['bf16_tflops']:>9.1f}"
                         f"{r['int8_ms']:>10.3f}{r['int8_speedup']:>10.2f}"
                         f"{r['w8a8_op_speedup']:>9.2f}{r['chunks2_eff']:>7.2f}"
                         f"{r['chunks4_eff']:>7.2f}{r['chunks8_eff']:>7.2f}")
    if gemm.get("w8a8_linear"):
        lines.append("\nW8A8 linear (ms): bf16 F.linear vs gemm_rs_w8a8 at tp=1 (dynamic "
                     "per-token, static per-tensor, int8 x per-token)")
        lines.append(f"{'H':>6}{'m':>5}{'bf16':>10}{'dynamic':>10}{'static':>10}{'int8 x':>10}"
                     f"{'_int_mm':>10}")
        for r in gemm["w8a8_linear"]:
            int_mm = f"{r['int_mm_ms']:>10.4f}" if r["int_mm_ms"] is not None else f"{'n/a':>10}"
            lines.append(f"{r['H']:>6}{r['m']:>5}{r['bf16_ms']:>10.4f}{r['dynamic_ms']:>10.4f}"
                         f"{r['static_ms']:>10.4f}{r['int8_x_ms']:>10.4f}{int_mm}")
    overlap = merged.get("bench-overlap", {})
    if overlap.get("overlap"):
        lines.append(f"\nPipelined vs sequential, forced collectives at tp=1 ({overlap['timing']},"
                     f" pipeline config {overlap['pipeline_config']}): x = sequential / "
                     "pipelined; eff = (sequential - pipelined) / min(gemm, collective)")
        lines.append(f"{'H':>6}{'n':>7}{'gemm':>8}{'RS':>8}{'AG':>8}{'rs seq':>9}{'rs pipe':>9}"
                     f"{'x':>6}{'eff':>7}{'ag seq':>9}{'ag pipe':>9}{'x':>6}{'eff':>7}")
        for r in overlap["overlap"]:
            lines.append(f"{r['H']:>6}{r['n']:>7}{r['gemm_ms']:>8.3f}{r['reduce_scatter_ms']:>8.3f}"
                         f"{r['all_gather_ms']:>8.3f}{r['gemm_rs_sequential_ms']:>9.3f}"
                         f"{r['gemm_rs_pipelined_ms']:>9.3f}{r['gemm_rs_speedup']:>6.2f}"
                         f"{r['gemm_rs_overlap_eff']:>7.2f}{r['ag_gemm_sequential_ms']:>9.3f}"
                         f"{r['ag_gemm_pipelined_ms']:>9.3f}{r['ag_gemm_speedup']:>6.2f}"
                         f"{r['ag_gemm_overlap_eff']:>7.2f}")
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_check.txt").write_text(text)
    print(text)
    return 0


def step_bitwise_modes(args) -> int:
    """Bitwise mode invariance on this device (README, "Numerics across the threshold"):
    with FLASHCOMM_BITWISE_MODES on and forced collectives, every layout-invariant op
    called sharded (n > sp_threshold) must equal the same call with enabled=False
    bitwise (at tp = 1 a rank owns every row, so every row is compared); fp32 / bf16 /
    fp16 and W8A8, n on both sides of the threshold, pipelined chunks included. It
    checks flashcomm's GEMM partitioning against cuBLAS's row-count dependent kernels;
    a sum over ranks in another order (NCCL's reduce-scatter vs all-reduce at tp >= 3)
    needs several GPUs and is not covered here. With the setting off, the fused ops'
    differences are recorded, not failed (they show what the setting is for)."""
    result = StepResult("bitwise-modes", args.device)
    import flashcomm

    gname = init_group(args.device, args.out, "bitwise-modes")
    dev = args.device
    before = flashcomm.bitwise_modes()

    def calls(dtype: torch.dtype, n: int) -> dict[str, Callable[[bool], tuple]]:
        x_row = _randn((n, K), 10 + n, dev, dtype)
        x_col = _randn((n, H), 20 + n, dev, dtype)
        res = _randn((n, H), 30 + n, dev, dtype)
        w_row = flashcomm.prepare_linear(_randn((N, K), 40, dev, dtype, K ** -0.5))
        w_col = flashcomm.prepare_linear(_randn((N, H), 50, dev, dtype, H ** -0.5))
        w_norm = _randn((H,), 60, dev, dtype)
        wq = torch.randint(-127, 128, (N, H), generator=_gen(70, dev), device=dev,
                           dtype=torch.int8)
        wq_row = torch.randint(-127, 128, (N, K), generator=_gen(71, dev), device=dev,
                               dtype=torch.int8)
        ws = torch.rand(N, generator=_gen(72, dev), device=dev) * 0.01 + 1e-3
        t, thr = SP_THRESHOLD, THRESHOLD
        return {
            "sp_row_linear": lambda e: (flashcomm.sp_row_linear(x_row, w_row, None, gname, t, e,
                                                                thr),),
            "sp_column_linear": lambda e: (flashcomm.sp_column_linear(
                x_col, w_col, None, gname, t, e, thr, True),),
            "sp_row_linear_w8a8": lambda e: (flashcomm.sp_row_linear_w8a8(
                x_row, wq_row, ws, None, None, None, gname, dtype, t, e, thr),),
            "sp_column_linear_w8a8": lambda e: (flashcomm.sp_column_linear_w8a8(
                x_col, wq, ws, None, None, None, gname, dtype, t, e, thr),),
            "sp_add_rms_norm": lambda e: flashcomm.sp_add_rms_norm(x_col, res, w_norm, EPS,
                                                                   gname, t, e, True),
            "sp_reduce": lambda e: (flashcomm.sp_reduce(x_col, gname, t, e),),
            "sp_gather": lambda e: (flashcomm.sp_gather(x_col, gname, t, e),),
        }

    record: dict[str, dict[str, int]] = {}
    try:
        for on in (True, False):
            flashcomm.init(gname, bitwise_modes=on)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for n in TOKENS:
                    for op, fn in calls(dtype, n).items():
                        what = f"{op} {dtype_name(dtype)} n={n} bitwise={int(on)}"

                        def compare(fn=fn) -> bool:
                            a, b = fn(True), fn(False)
                            synchronize(dev)
                            return all(torch.equal(x, y) for x, y in zip(a, b))

                        same = run_guarded(result, what, compare)
                        r = record.setdefault(f"{op} bitwise={int(on)}", {"calls": 0,
                                                                          "differ": 0})
                        r["calls"] += 1
                        if same is False:
                            r["differ"] += 1
                            if on:
                                result.fail(f"{what}: sharded != replicated")
    finally:
        flashcomm.set_bitwise_modes(before)
    print("\n  op, setting                      calls  differ (sharded vs replicated)")
    for key, r in sorted(record.items()):
        print(f"  {key:<34}{r['calls']:>6}{r['differ']:>8}")
    result.data["per_op"] = record
    return result.finish(args.out)


STEPS: dict[str, Callable[[argparse.Namespace], int]] = {
    "env": step_env, "probe": step_probe,
    "checks": step_checks, "opcheck": step_opcheck, "graphs": step_graphs,
    "compile": step_compile, "bench-gemm": step_bench_gemm, "bench-overlap": step_bench_overlap,
    "report": step_report, "bitwise-modes": step_bitwise_modes,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (compile step)")
    p.add_argument("--store-dir", type=Path, default=None,
                   help="directory of the process groups' file stores (default: --out)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    global STORE_DIR
    STORE_DIR = args.store_dir.resolve() if args.store_dir else None
    if (hang := os.environ.get("GPU_CHECK_DEBUG_HANG")) and hang == args.step:
        print(f"gpu_check: GPU_CHECK_DEBUG_HANG={hang}: this step hangs (rehearsal)", flush=True)
        while True:
            time.sleep(3600)
    if args.device == "cuda" and args.step not in ("env", "report") and \
            not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 1
    try:
        return STEPS[args.step](args)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
