"""Where a converted row-parallel layer's time goes, in eager mode (vllm_bench.py layers'
set-up: one real vLLM TP group, tp = 2, 1 thread per rank).

Side by side, round robin, after a barrier and a tiny shared-memory all-reduce, median
over repeats of the slowest rank, µs:

* the GEMM alone (vLLM's ``quant_method.apply``) on vLLM's layer and on the converted
  layer (identically processed weights);
* vLLM's layer (GEMM + vLLM's all-reduce) and the converted layer (engine form, own
  transport: GEMM + ``sp_reduce_``) through their forwards;
* vLLM's GEMM then ``sp_reduce_`` called directly (what the converted forward does,
  without its Python);
* the all-reduce alone, vLLM's and flashcomm's (in place).

    .venv/bin/python benchmarks/row_layer_split.py --kind w8a8 --hidden 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIG = 1 << 40  # sp_threshold that keeps every call replicated
SP_THRESHOLD = 1000  # the layers bench's (vllm_bench.py --sp-threshold default)


def _rank(hidden: int, kind: str, tokens: list[int], repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    import vllm_bench as vb
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.utils.torch_utils import set_default_torch_dtype

    groups, _ = vb.setup_groups(SP_THRESHOLD)
    own = groups["own"]
    rank, tp = dist.get_rank(), dist.get_world_size()
    one = torch.zeros(1, 1)
    dtype = getattr(torch, vb.KIND_DTYPE[kind])
    g = torch.Generator().manual_seed(1000 + rank)
    with set_current_vllm_config(VllmConfig()), set_default_torch_dtype(dtype):
        layers = vb._build_layers(kind, hidden, dtype, g, groups, SP_THRESHOLD)
    v, o = layers["v_row"], layers["o_row"]
    out = {}
    for n in tokens:
        x = torch.randn(n, vb.INTER_PER_HIDDEN * hidden // tp, generator=g).to(dtype)
        y = torch.randn(n, hidden).to(dtype)

        def gemm_then_reduce(x=x):
            torch.ops.flashcomm.sp_reduce_(v.quant_method.apply(v, x, None), own, BIG, True)

        cases = {
            "GEMM alone, vLLM's layer": lambda x=x: v.quant_method.apply(v, x, None),
            "GEMM alone, converted layer": lambda x=x: o.quant_method.apply(o, x, None),
            "vLLM's layer (GEMM + AR)": lambda x=x: v(x),
            "converted layer (own shm)": lambda x=x: o(x),
            "GEMM + sp_reduce_, no layer": gemm_then_reduce,
            "AR alone, vLLM": lambda y=y: tensor_model_parallel_all_reduce(y),
            "AR alone, sp_reduce_": lambda y=y: torch.ops.flashcomm.sp_reduce_(y, own, BIG,
                                                                               True),
        }
        keys = list(cases)
        for key in keys:
            for _ in range(3):
                cases[key]()
        times = {key: [] for key in keys}
        for r in range(repeats):
            shift = r % len(keys)
            for key in keys[shift:] + keys[:shift]:
                dist.barrier()
                torch.ops.flashcomm.sp_reduce_(one, own, BIG, True)
                t0 = time.perf_counter()
                cases[key]()
                times[key].append((time.perf_counter() - t0) * 1e6)
        out[n] = times
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="w8a8", choices=("fp32", "bf16", "w8a8"))
    p.add_argument("--hidden", type=int, default=1024, help="H; the row layer is 3H -> H")
    p.add_argument("--tokens", default="1,8", help="token counts, comma list")
    p.add_argument("--repeats", type=int, default=100)
    a = p.parse_args(argv)
    sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "python")]
    from flashcomm.tools.testing import RankPool
    with RankPool(2, timeout_s=600, threads_per_rank=1) as pool:
        res = pool.run(_rank, a.hidden, a.kind, [int(t) for t in a.tokens.split(",")],
                       a.repeats, timeout_s=1800)
    for n, times in res[0].items():
        print(f"{a.kind} H={a.hidden} n={n}: µs, median of {a.repeats} (slowest rank)")
        for key in times:
            slowest = [max(ts) for ts in zip(*(r[n][key] for r in res))]
            print(f"  {key:<30} {statistics.median(slowest):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
