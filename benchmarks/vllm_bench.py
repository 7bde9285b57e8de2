"""flashcomm inside vLLM vs vLLM alone, on this machine (CPU, tp=2).

Two parts, both printing a table and writing JSON:

``layers``: where the time of a flashcomm-converted layer goes, against the same
vLLM layer unconverted, in one real vLLM TP group (the ranks' gloo world, vLLM's CPU
communicator): the all-reduce alone (vLLM's ``tensor_model_parallel_all_reduce``, which
on CPU is its shared-memory all-reduce, vs ``dist.all_reduce`` on the TP group's c10d
ProcessGroup, which is what flashcomm's ops use), the row-parallel layer (vLLM: oneDNN
GEMM + SHM all-reduce; flashcomm: ``sp_row_linear``), the column-parallel layer and the
boundary fused add + RMSNorm, at the tiny test model's shapes, for a decode batch and a
prefill batch. Medians of ``--repeats`` after warm-up, every variant side by side,
the slowest rank per repeat.

``e2e``: ``vllm.LLM`` on the tiny Qwen3 checkpoint (fp32, tp=2) with flashcomm on and
off, prefill of 4 x 100 tokens and per-step decode of 4 sequences (the engine runner
``flashcomm.tools.vllm_engine``, ``--bench``); the engines run one after the other,
alternating, ``--rounds`` times each.

    .venv/bin/python benchmarks/vllm_bench.py layers --json benchmarks/results/vllm_layers_cpu2.json
    .venv/bin/python benchmarks/vllm_bench.py e2e --json benchmarks/results/vllm_e2e_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 128, 256, 4, 2, 32


def _time(fn, repeats: int, warmup: int = 3) -> list[float]:
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _layers_case(tokens: list[int], repeats: int, sp_threshold: int) -> dict:
    """On every rank: per variant, the list of per-repeat ms (max over ranks later)."""
    import torch.distributed as dist
    import flashcomm
    from flashcomm.vllm import layers as fl
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import get_tp_group, tensor_model_parallel_all_reduce
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    from flashcomm.vllm.standalone import init_vllm_tp, vllm_tp_transport
    init_vllm_tp()
    tp = dist.get_world_size()
    group = get_tp_group()
    # flashcomm layers on vLLM's TP device group all-reduce through vLLM's communicator
    # (the plugin's default); those on a second gloo group over the same ranks go
    # through c10d (FLASHCOMM_VLLM_ALL_REDUCE=0).
    gname = group.device_group.group_name
    flashcomm.set_all_reduce_provider(gname, "vllm::all_reduce", group.unique_name)
    c10d_group = dist.new_group(list(range(tp)), backend="gloo")
    c10d_name = c10d_group.group_name
    g = torch.Generator().manual_seed(0)
    res: dict[str, dict[str, list[float]]] = {}
    with set_current_vllm_config(VllmConfig()), torch.inference_mode():
        def build(converted: bool, gname: str = gname):
            # flashcomm's subclasses are what the plugin makes vLLM instantiate.
            row_cls = fl.FlashcommRowParallelLinear if converted else RowParallelLinear
            col_cls = (fl.FlashcommMergedColumnParallelLinear if converted
                       else MergedColumnParallelLinear)
            row = row_cls(INTER, HIDDEN, bias=False, params_dtype=torch.float32)
            col = col_cls(HIDDEN, [INTER, INTER], bias=False, params_dtype=torch.float32)
            norm = (fl.FlashcommRMSNorm if converted else RMSNorm)(HIDDEN, eps=1e-6)
            for m in (row, col):
                m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
                if converted:  # what convert_model does before weights load
                    fl.wrap_process_weights(m, "fp")
                    m._fc_state = fl.FcState(gname, sp_threshold)
                m.quant_method.process_weights_after_loading(m)
            if converted:
                norm._fc_state = fl.FcState(gname, sp_threshold)
            return row, col, norm

        v_row, v_col, v_norm = build(False)
        f_row, f_col, f_norm = build(True, c10d_name)
        p_row, _, _ = build(True)
        for n in tokens:
            x_row = torch.randn(n, INTER // tp, generator=g)
            x_col = torch.randn(n, HIDDEN, generator=g)
            resid = torch.randn(n, HIDDEN, generator=g)
            y = torch.randn(n, HIDDEN, generator=g)
            y_c10d = y.clone()
            variants = {
                "all_reduce vLLM": lambda: tensor_model_parallel_all_reduce(y),
                "all_reduce c10d gloo": lambda: dist.all_reduce(
                    y_c10d, group=group.device_group),
                "row vLLM": lambda: v_row(x_row),
                "row flashcomm (c10d all-reduce)": lambda: f_row(x_row),
                "row flashcomm (vLLM all-reduce)": lambda: p_row(x_row),
                "column vLLM": lambda: v_col(x_col),
                "column flashcomm": lambda: f_col(x_col),
                "add+rmsnorm vLLM": lambda: v_norm(x_col.clone(), resid.clone()),
                "add+rmsnorm flashcomm": lambda: f_norm(x_col, resid),
            }
            # Side by side: round robin over variants, order rotated every repeat.
            names = list(variants)
            times: dict[str, list[float]] = {k: [] for k in names}
            for name in names:
                _time(variants[name], 0, warmup=3)
            for r in range(repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name] += _time(variants[name], 1, warmup=0)
            res[str(n)] = times
    flashcomm.clear_all_reduce_provider(gname)
    return {"times": res, "transport": vllm_tp_transport()}


def run_layers(args) -> dict:
    sys.path.insert(0, str(ROOT / "python"))
    from flashcomm.tools.testing import RankPool
    with RankPool(2) as pool:
        try:
            per_rank = pool.run(_layers_case, args.tokens, args.repeats, args.sp_threshold,
                                timeout_s=1800)
        finally:
            from flashcomm.vllm.standalone import destroy_vllm_tp
            pool.run(destroy_vllm_tp)
    transport = per_rank[0]["transport"]
    per_rank = [r["times"] for r in per_rank]
    out: dict[str, dict[str, float]] = {}
    for n in per_rank[0]:
        out[n] = {}
        for name in per_rank[0][n]:
            slowest = [max(r[n][name][i] for r in per_rank)
                       for i in range(len(per_rank[0][n][name]))]
            out[n][name] = round(statistics.median(slowest), 4)
    names = list(next(iter(out.values())))
    print(f"{'variant (ms, median, slowest rank)':38}" + "".join(f"{'n=' + n:>10}"
                                                                  for n in out))
    for name in names:
        print(f"{name:38}" + "".join(f"{out[n][name]:>10.3f}" for n in out))
    print(f"vLLM TP group transport: {transport}")
    return {"layers_ms": out, "vllm_transport": transport, "tokens": args.tokens,
            "repeats": args.repeats, "sp_threshold": args.sp_threshold,
            "shapes": {"hidden": HIDDEN, "intermediate": INTER}}


def run_e2e(args) -> dict:
    sys.path.insert(0, str(ROOT / "python"))
    from flashcomm.tools import vllm_engine as tv
    # "on": the plugin's default (replicated all-reduces through vLLM's communicator);
    # "on, c10d all-reduce": FLASHCOMM_VLLM_ALL_REDUCE=0.
    modes = {"off": (False, "1"), "on": (True, "1"), "on, c10d all-reduce": (True, "0")}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = tv.make_checkpoint(tmp, "qwen3", "--arch", "qwen3")
        for _ in range(args.rounds):
            for mode, (enable, vllm_ar) in modes.items():
                os.environ["FLASHCOMM_VLLM_ALL_REDUCE"] = vllm_ar
                res, log = tv.run_engine(tmp, model, enable=enable, bench=True)
                if res is None:
                    raise RuntimeError(f"engine ({mode}) failed:\n{log[-4000:]}")
                runs[mode].append({k: res[k] for k in ("prefill_ms_400tok",
                                                       "decode_ms_per_step_4seq")})
    out = {mode: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
           for mode, rs in runs.items()}
    print(f"{'':22}{'prefill 400 tok (ms)':>22}{'decode step, 4 seq (ms)':>26}")
    for mode in modes:
        print(f"{mode:22}{out[mode]['prefill_ms_400tok']:>22.2f}"
              f"{out[mode]['decode_ms_per_step_4seq']:>26.2f}")
    return {"median": out, "runs": runs, "sp_threshold": tv.SP_THRESHOLD}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lp = sub.add_parser("layers", help="per-layer comparison in one vLLM TP group")
    lp.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")],
                    default=[4, 400], help="token counts (default 4,400)")
    lp.add_argument("--repeats", type=int, default=50)
    lp.add_argument("--sp-threshold", type=int, default=16,
                    help="flashcomm layers run sharded above this (default 16, as the tests)")
    ep = sub.add_parser("e2e", help="vllm.LLM with flashcomm on and off")
    ep.add_argument("--rounds", type=int, default=2, help="engine starts per mode")
    for sp in (lp, ep):
        sp.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    import platform
    machine = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
               "processor": platform.processor() or platform.machine(),
               "torch": torch.__version__}
    try:
        import vllm
        machine["vllm"] = vllm.__version__
    except Exception:
        pass
    res = run_layers(args) if args.what == "layers" else run_e2e(args)
    res["machine"] = machine
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
