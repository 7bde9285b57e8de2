"""`flashcomm bench` and `flashcomm tune`: the compact ops against their parts and the
plain-TP baseline, on ``tp`` spawned CPU ranks in one gloo group (NCCL is not used here).

Op level, per op (gemm_rs, ag_gemm, and their W8A8 forms) and token count n, all variants
measured side by side in one run (:mod:`.cases` builds them, :mod:`.timing` times them):
``gemm`` (the op on a one-rank group: its GEMM alone), ``comm`` (the collective alone),
``tp_ar`` (plain TP: ``torch.mm`` + ``all_reduce``; row-parallel only), ``py`` (the
sharded layout composed in Python), ``seq`` / ``pipe`` / ``auto`` (the op forced
sequential, forced pipelined, and with ``threshold=-1``). :mod:`.metrics` derives overlap
efficiency ``(T_gemm + T_comm - T_pipe) / min(T_gemm, T_comm)``, the op's overhead over
the Python composition, the policy's choice against the faster fixed strategy, and the
crossovers; :mod:`.report` prints, plots and writes JSON; :mod:`.run` orders a
benchmark, :mod:`.tune` a tuning run. Every figure: per-repeat maximum over ranks,
median over repeats after warm-up.
"""

from .report import format_report, write_json, write_plot
from .run import DEFAULT_MODEL_TOKENS, DEFAULT_TOKENS, BenchConfig, op_shapes, run_bench
from .tune import TuneConfig, model_op_shapes, run_tune

__all__ = ["DEFAULT_MODEL_TOKENS", "DEFAULT_TOKENS", "BenchConfig", "TuneConfig",
           "format_report", "model_op_shapes", "op_shapes", "run_bench", "run_tune",
           "write_json", "write_plot"]
