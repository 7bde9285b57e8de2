"""GPU check for flashcomm on one CUDA device (tp = 1), run by scripts/gpu_check.sh.

1. correctness of every compact op on CUDA against the dense reference, both
   strategies requested (tp = 1 runs the GEMM alone: no collective);
2. torch.library.opcheck of every op with CUDA samples;
3. CUDA-graph capture and replay of every op (tp = 1), output equal to eager;
4. torch.compile (fullgraph, dynamic token dim) of every op, no recompile across n;
5. timings with CUDA events (median of repeats after warm-up): int8 GEMM
   (torch._int_mm, and the flashcomm W8A8 op incl. quantisation) vs bf16 GEMM, and
   chunked-GEMM efficiency (one GEMM vs 2/4/8 row chunks, as the pipelined path
   splits it) at n = 1K..16K, H = 4096 and 8192.

Exits non-zero if any check fails. Prints tables; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback

import torch
import torch.distributed as dist


def _init_group() -> str:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    backend = "nccl" if dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    return dist.group.WORLD.group_name


def _samples(gname: str, n: int, K: int, N: int):
    import flashcomm  # noqa: F401
    from flashcomm.reference import quantize_weight_per_channel

    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, K, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) / K**0.5
    b = torch.randn(N, device="cuda", generator=g, dtype=torch.bfloat16)
    w_q, w_s = quantize_weight_per_channel(w)
    ops = torch.ops.flashcomm
    for thr in (0, 1000):
        yield "gemm_rs", ops.gemm_rs.default, (x, w, b, gname, thr, True), \
            lambda: (x.float() @ w.float().t() + b.float())
        yield "ag_gemm", ops.ag_gemm.default, (x, w, b, gname, n, thr, True, False), \
            lambda: (x.float() @ w.float().t() + b.float())
        yield "gemm_rs_w8a8", ops.gemm_rs_w8a8.default, \
            (x, w_q, w_s, None, None, b, gname, torch.bfloat16, thr, True), \
            lambda: (x.float() @ (w_q.float() * w_s[:, None]).t() + b.float())
        yield "ag_gemm_w8a8", ops.ag_gemm_w8a8.default, \
            (x, w_q, w_s, None, None, b, gname, n, torch.bfloat16, thr, True, False), \
            lambda: (x.float() @ (w_q.float() * w_s[:, None]).t() + b.float())


def check_ops(gname: str) -> list[str]:
    failures = []
    for n in (1, 17, 64, 1001):
        for name, op, args, ref in _samples(gname, n, 256, 128):
            try:
                out = op(*args)
                want = ref()
                err = ((out.float() - want).norm() / want.norm().clamp_min(1e-6)).item()
                tol = 0.03 if "w8a8" in name else 0.01
                assert out.device.type == "cuda" and out.shape == want.shape, \
                    (out.shape, want.shape)
                assert err < tol, f"relative error {err:.3g} >= {tol}"
                thr = args[-2] if "ag" not in name else args[5 if name == "ag_gemm" else 9]
                print(f"  ok   correctness {name:<13} n={n:<5} threshold={thr} rel.err {err:.2e}")
            except Exception:
                failures.append(f"correctness {name} n={n}: {traceback.format_exc(limit=2)}")
                print(f"  FAIL correctness {name} n={n}")
    return failures


def check_opcheck(gname: str) -> list[str]:
    failures = []
    for n in (1, 33):
        for name, op, args, _ in _samples(gname, n, 64, 32):
            try:
                torch.library.opcheck(op, args)
                print(f"  ok   opcheck     {name:<13} n={n}")
            except Exception:
                failures.append(f"opcheck {name} n={n}: {traceback.format_exc(limit=3)}")
                print(f"  FAIL opcheck     {name} n={n}")
    return failures


def check_cuda_graphs(gname: str) -> list[str]:
    failures = []
    for n in (16, 512):
        for name, op, args, _ in _samples(gname, n, 256, 128):
            try:
                eager = op(*args)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):  # warm-up on a side stream, as the docs ask
                    for _ in range(2):
                        op(*args)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = op(*args)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(static_out, eager), "graph replay differs from eager"
                print(f"  ok   cuda graph  {name:<13} n={n}")
            except Exception:
                failures.append(f"cuda graph {name} n={n}: {traceback.format_exc(limit=3)}")
                print(f"  FAIL cuda graph  {name} n={n}")
    return failures


def check_compile(gname: str) -> list[str]:
    import flashcomm
    from flashcomm.reference import quantize_weight_per_channel

    failures = []
    K, N = 256, 128
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    w_q, w_s = quantize_weight_per_channel(w)

    def fn(x):
        a = flashcomm.gemm_rs(x, w, None, gname, -1, True)
        b = flashcomm.ag_gemm(x, w, None, gname, x.shape[0], -1, True)
        c = flashcomm.gemm_rs_w8a8(x, w_q, w_s, None, None, None, gname, torch.bfloat16, -1)
        d = flashcomm.ag_gemm_w8a8(x, w_q, w_s, None, None, None, gname, x.shape[0],
                                   torch.bfloat16, -1)
        return a + b + c + d

    for backend in ("aot_eager", "inductor"):
        try:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
            for n in (17, 64, 1001, 3000):
                x = torch.randn(n, K, device="cuda", dtype=torch.bfloat16)
                got, want = compiled(x), fn(x)
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                assert err < 0.02, f"n={n}: compiled vs eager rel.err {err:.3g}"
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert graphs == 1, f"{graphs} graphs for 4 token counts (expected 1)"
            print(f"  ok   compile     {backend:<13} 1 graph for n = 17, 64, 1001, 3000")
        except Exception:
            failures.append(f"compile {backend}: {traceback.format_exc(limit=3)}")
            print(f"  FAIL compile     {backend}")
    return failures


def _time_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(gname: str, tokens, hiddens, warmup: int, repeats: int) -> list[dict]:
    import flashcomm  # noqa: F401
    from flashcomm.reference import quantize_dynamic, quantize_weight_per_channel

    rows = []
    for H in hiddens:
        w = torch.randn(H, H, device="cuda", dtype=torch.bfloat16) / H**0.5
        w_q, w_s = quantize_weight_per_channel(w)
        w_qT = w_q.t()  # column-major [K, N], the layout cuBLASLt int8 wants
        for n in tokens:
            x = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
            q, _ = quantize_dynamic(x)
            out = torch.empty(n, H, device="cuda", dtype=torch.bfloat16)
            r = {"H": H, "n": n}
            r["bf16_ms"] = _time_ms(lambda: torch.mm(x, w.t(), out=out), warmup, repeats)
            r["int8_ms"] = _time_ms(lambda: torch._int_mm(q, w_qT), warmup, repeats)
            r["w8a8_op_ms"] = _time_ms(lambda: torch.ops.flashcomm.gemm_rs_w8a8(
                x, w_q, w_s, None, None, None, gname, torch.bfloat16, 1000, True),
                warmup, repeats)
            flops = 2.0 * n * H * H
            r["bf16_tflops"] = flops / r["bf16_ms"] / 1e9
            r["int8_tops"] = flops / r["int8_ms"] / 1e9
            r["int8_speedup"] = r["bf16_ms"] / r["int8_ms"]
            r["w8a8_op_speedup"] = r["bf16_ms"] / r["w8a8_op_ms"]
            for chunks in (2, 4, 8):
                bounds = [n * i // chunks for i in range(chunks + 1)]

                def chunked(bounds=bounds):
                    for lo, hi in zip(bounds, bounds[1:]):
                        torch.mm(x[lo:hi], w.t(), out=out[lo:hi])

                r[f"chunks{chunks}_eff"] = r["bf16_ms"] / _time_ms(chunked, warmup, repeats)
            rows.append(r)
            print(f"  H={H:<5} n={n:<6} bf16 {r['bf16_ms']:8.3f} ms "
                  f"({r['bf16_tflops']:6.1f} TFLOP/s)  int8 {r['int8_ms']:8.3f} ms "
                  f"({r['int8_tops']:6.1f} TOP/s)  x{r['int8_speedup']:.2f}"
                  f"  w8a8 op x{r['w8a8_op_speedup']:.2f}  chunk eff 2/4/8: "
                  f"{r['chunks2_eff']:.2f}/{r['chunks4_eff']:.2f}/{r['chunks8_eff']:.2f}",
                  flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384")
    p.add_argument("--hidden", default="4096,8192")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    gname = _init_group()
    failures: list[str] = []
    if not args.skip_checks:
        for title, check in (("ops on CUDA vs dense reference", check_ops),
                             ("opcheck", check_opcheck),
                             ("CUDA-graph capture (tp=1)", check_cuda_graphs),
                             ("torch.compile", check_compile)):
            print(f"== {title}")
            failures += check(gname)
    print("== int8 vs bf16 GEMM and chunked-GEMM efficiency (CUDA events, median of "
          f"{args.repeats} after {args.warmup} warm-up)")
    rows = bench(gname, [int(v) for v in args.tokens.split(",")],
                 [int(v) for v in args.hidden.split(",")], args.warmup, args.repeats)
    hdr = (f"{'H':>6}{'n':>7}{'bf16 ms':>10}{'int8 ms':>10}{'int8/bf16':>10}{'w8a8 op':>10}"
           f"{'eff 2':>7}{'eff 4':>7}{'eff 8':>7}")
    print(f"\n{name}: int8 speed-up = bf16 ms / int8 ms; w8a8 op = flashcomm gemm_rs_w8a8 "
          f"(tp=1: quantise + int8 GEMM + dequantise) speed-up over bf16; eff k = one GEMM / "
          f"k row-chunk GEMMs\n{hdr}")
    for r in rows:
        print(f"{r['H']:>6}{r['n']:>7}{r['bf16_ms']:>10.3f}{r['int8_ms']:>10.3f}"
              f"{r['int8_speedup']:>10.2f}{r['w8a8_op_speedup']:>10.2f}{r['chunks2_eff']:>7.2f}"
              f"{r['chunks4_eff']:>7.2f}{r['chunks8_eff']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows,
                       "failures": failures}, f, indent=1)
    dist.destroy_process_group()
    if failures:
        print(f"\n{len(failures)} check(s) FAILED:\n" + "\n".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
