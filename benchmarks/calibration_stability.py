"""How stable ``sp_threshold=auto`` is: the calibration's own measurement
(:func:`flashcomm.vllm.calibration.measure` on the engine-form boundary) repeated on two
real ranks (gloo group, the default transport), with the pick at several margins.

Each repetition is what one vLLM start measures; the pick should not move between
them. Prints, per hidden size and margin, the picks of every repetition, and the
per-point paired ratios (sharded / replicated; < 1: sharded faster), and what one
replicated boundary costs at each point (the ceiling on what sharding it can save).

    .venv/bin/python benchmarks/calibration_stability.py --hidden 1024,2048 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import flashcomm
    from flashcomm.vllm import calibration as cal
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = flashcomm.group_name(None)
        dtype = getattr(torch, args.dtype)
        rows = []
        for hidden in args.hidden:
            weight = torch.ones(hidden, dtype=dtype)
            boundary = cal.engine_boundary(hidden, dtype, torch.device("cpu"), group,
                                           weight, 1e-6)
            tokens = cal.ladder(args.max_tokens)
            for _ in range(args.repeats):
                m = cal.measure(boundary, tokens, hidden, weight.element_size(),
                                torch.device("cpu"), budget_s=60.0)
                rows.append({"hidden": hidden, "tokens": m.tokens, "ratios": m.ratios,
                             "replicated_us": [t * 1e6 for t in m.replicated_s],
                             "sharded_us": [t * 1e6 for t in m.sharded_s],
                             "seconds": m.seconds})
        if rank == 0:
            from flashcomm.tools.provenance import provenance
            Path(out).write_text(json.dumps({"provenance": provenance(), "rows": rows}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="1024,2048",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--margins", default="0.05,0.08,0.10",
                   type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--out", default=None, help="JSON of every repetition's ratios")
    args = p.parse_args()
    from flashcomm.vllm import calibration as cal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.out or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                   f"calibration_stability_{os.getpid()}.json")
    mp.spawn(_rank, args=(port, args, out), nprocs=2)
    rows = json.loads(Path(out).read_text())["rows"]
    if args.out is None:
        os.unlink(out)
    print(f"default margin {cal.MARGIN}; pick per repetition (max tokens {args.max_tokens} = "
          "never sharded)")
    for hidden in args.hidden:
        mine = [r for r in rows if r["hidden"] == hidden]
        for margin in args.margins:
            picks = [cal.pick_from_ratios(r["tokens"], r["ratios"], args.max_tokens, margin)
                     for r in mine]
            print(f"hidden {hidden} margin {margin:.2f}: {picks}  "
                  f"({len(set(picks))} distinct)")
        for r in mine:
            print(f"  ratios at {r['tokens'][0]}..{r['tokens'][-1]}: "
                  + " ".join(f"{q:.2f}" for q in r["ratios"]))
        best = {n: min(r["replicated_us"][i] for r in mine if i < len(r["tokens"]))
                for i, n in enumerate(mine[0]["tokens"])}
        print("  one replicated boundary (all-reduce + add + RMSNorm), fastest repetition, "
              "us: " + " ".join(f"{n}:{t:.0f}" for n, t in best.items()))


if __name__ == "__main__":
    main()
