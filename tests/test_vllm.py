"""flashcomm's vLLM plugin against the real vLLM (CPU, tp=2 over gloo / SHM).

Each configuration runs ``vllm.LLM`` in its own subprocess (``python tests/test_vllm.py
run ...``; spawn-safe, keeps this process clean), once with ``FLASHCOMM_ENABLE=1`` and
once without, on a tiny checkpoint written by ``scripts/make_tiny_checkpoint.py``.
Greedy decoding of token-id prompts; ``FLASHCOMM_SP_THRESHOLD=16`` so the prefill of
3 prompts x 12 tokens (36 tokens) runs sharded and the decode steps (3 tokens) and a
one-prompt prefill of 8 tokens run replicated. float32 (Qwen3 FP, Mistral FP, Qwen3
W8A8 dynamic, Llama W8A8 static): token ids identical. bfloat16 (Qwen2 with qkv bias): identical
except after a near-tie (vLLM's oneDNN GEMM and ATen's round differently in bf16).
Refusals: a MoE model through the engine; pipeline parallel, LoRA, vLLM's fusion pass
and unknown architectures on real ``VllmConfig`` objects.

Skipped (with the reason) when vLLM is not importable: ``pip install -e .[vllm]``.
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


def _vllm_missing() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return (f"vLLM is not importable ({type(e).__name__}: {e}); install the extra: "
                f"pip install -e .[vllm]")
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


def _engine_env(tmp: Path, enable: bool, tp: int) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "python")]
    shim = _plugin_shim(tmp)
    if shim:
        paths.append(shim)
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
        "VLLM_CPU_CI_ENV": "1",  # torch.compile with the eager backend: fast start
        "VLLM_DISABLE_COMPILE_CACHE": "1",
        # collective_rpc with a function (flashcomm.vllm.plugin.worker_stats) pickles it
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        "VLLM_CACHE_ROOT": str(tmp / "vllm_cache"),
        "FLASHCOMM_SP_THRESHOLD": str(SP_THRESHOLD),
    })
    env.pop("FLASHCOMM_ENABLE", None)
    if enable:
        env["FLASHCOMM_ENABLE"] = "1"
    return env


def run_engine(tmp: Path, model: Path, enable: bool, tp: int = 2, dtype: str = "float32",
               bench: bool = False, logprobs: bool = False) -> tuple[dict | None, str]:
    out = tmp / f"result_{model.name}_{'on' if enable else 'off'}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", str(model), str(out),
           "--tp", str(tp), "--dtype", dtype] + (["--bench"] if bench else []) + \
        (["--logprobs"] if logprobs else [])
    t0 = time.time()
    proc = subprocess.run(cmd, env=_engine_env(tmp, enable, tp), capture_output=True,
                          text=True, timeout=ENGINE_TIMEOUT_S, cwd=str(tmp))
    log = proc.stdout + proc.stderr
    (tmp / (out.stem + ".log")).write_text(log)
    if proc.returncode != 0 or not out.exists():
        return None, log
    res = json.loads(out.read_text())
    res["wall_s"] = round(time.time() - t0, 1)
    return res, log


def make_checkpoint(tmp: Path, name: str, *args: str) -> Path:
    d = tmp / name
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(d),
                    "--dtype", "float32", *args], check=True, capture_output=True, text=True)
    return d


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------

def _sum_mode(stats: dict, mode: str, ops: tuple[str, ...]) -> int:
    return sum(stats.get(op, {}).get(mode, 0) for op in ops)


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


def check_on_off(tmp: Path, model: Path, w8a8: bool, dtype: str = "float32",
                 tie_nats: float | None = None) -> tuple[dict, dict]:
    """``tie_nats=None``: greedy ids identical; else identical except after near-ties."""
    lp = tie_nats is not None
    off, log_off = run_engine(tmp, model, enable=False, dtype=dtype, logprobs=lp)
    assert off is not None, f"vLLM run without flashcomm failed:\n{log_off[-6000:]}"
    on, log_on = run_engine(tmp, model, enable=True, dtype=dtype, logprobs=lp)
    assert on is not None, f"vLLM run with flashcomm failed:\n{log_on[-6000:]}"
    print(f"\n{model.name}: off {off['wall_s']} s, on {on['wall_s']} s", file=sys.stderr)

    # Without the plugin enabled nothing is converted and no flashcomm op runs.
    for w in off["workers_after"]:
        assert w["converted"] == 0 and not any(sum(v.values()) for v in w["stats"].values())
    # Greedy token ids: identical with flashcomm on and off (FP and W8A8 alike: both
    # paths quantise per token / per tensor the same way and dequantise in fp32; the
    # tolerance for W8A8 is 0 differing tokens on this model).
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

    row = ("sp_row_linear_w8a8",) if w8a8 else ("sp_row_linear",)
    col = ("sp_column_linear_w8a8",) if w8a8 else ("sp_column_linear",)
    assert len(on["workers_after"]) == 2
    for before, after, plain in zip(on["workers_before"], on["workers_after"],
                                    off["workers_after"]):
        n_layers = 2
        assert after["converted"] == 6 * n_layers + 1, after
        # Replicated calls all-reduce through vLLM's own communicator (the default).
        assert after["all_reduce_provider"].startswith("vllm::all_reduce(tp"), after
        st = after["stats"]  # counted during the generate calls only
        for ops in (row, col, ("sp_add_rms_norm",)):
            assert _sum_mode(st, "sharded", ops) > 0, (ops, st)
            assert _sum_mode(st, "replicated", ops) > 0, (ops, st)
        # No recompilation: the dynamo counters did not move while batches below and
        # above the threshold ran, and flashcomm adds no graph to vLLM's own (one graph;
        # two when log-probs are requested, with flashcomm on or off).
        assert after["dynamo"] == before["dynamo"], (before["dynamo"], after["dynamo"])
        graphs = after["dynamo"].get("stats", {}).get("unique_graphs")
        assert graphs == plain["dynamo"].get("stats", {}).get("unique_graphs"), \
            (after["dynamo"], plain["dynamo"])
        if not lp:
            assert graphs == 1, after["dynamo"]
    assert on["ids_big_first"] == on["ids_big"]
    return off, on


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

def test_qwen3_fp_identical_tokens(tmp_path):
    model = make_checkpoint(tmp_path, "qwen3", "--arch", "qwen3")
    check_on_off(tmp_path, model, w8a8=False)


def test_qwen3_w8a8_identical_tokens(tmp_path):
    model = make_checkpoint(tmp_path, "qwen3-w8a8", "--arch", "qwen3", "--w8a8", "--act",
                            "dynamic")
    check_on_off(tmp_path, model, w8a8=True)


def test_qwen2_qkv_bias_bf16_tokens(tmp_path):
    # bfloat16: vLLM's oneDNN GEMM and ATen's accumulate in different orders, so a few
    # outputs round to the neighbouring bf16 value. Tolerance: greedy ids identical
    # except where, in the run without flashcomm, the token flashcomm picked was the
    # runner-up within BF16_TIE_NATS of the top choice (a near-tie); after such a
    # position the sequences may legitimately differ.
    model = make_checkpoint(tmp_path, "qwen2", "--arch", "qwen2")
    check_on_off(tmp_path, model, w8a8=False, dtype="bfloat16", tie_nats=BF16_TIE_NATS)


def test_llama_w8a8_static_identical_tokens(tmp_path):
    # Llama (no qkv bias, no q/k norm) with static per-tensor activation scales: the
    # fused layers' per-shard input scales are merged the way vLLM's kernel merges them.
    model = make_checkpoint(tmp_path, "llama-w8a8-static", "--arch", "llama", "--w8a8",
                            "--act", "static")
    check_on_off(tmp_path, model, w8a8=True)


def test_mistral_fp_identical_tokens(tmp_path):
    # vLLM builds Mistral with its own classes (MistralForCausalLM / MistralDecoderLayer).
    model = make_checkpoint(tmp_path, "mistral", "--arch", "mistral")
    check_on_off(tmp_path, model, w8a8=False)


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
    p.add_argument("--logprobs", action="store_true", help=f"top-{TOP_LOGPROBS} log-probs")
    a = p.parse_args(argv)
    from vllm import LLM, SamplingParams
    from flashcomm.vllm.plugin import worker_reset_stats, worker_stats

    llm = LLM(model=a.model, tensor_parallel_size=a.tp, skip_tokenizer_init=True,
              dtype=a.dtype, enforce_eager=False, max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=512, seed=0, enable_prefix_caching=False)
    # --logprobs: top-2 log-probabilities of every generated position: where two runs
    # pick different tokens, they tell whether the position was a near-tie. (vLLM then
    # traces a second graph, with flashcomm on or off.)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                        detokenize=False, logprobs=TOP_LOGPROBS if a.logprobs else None)
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
    res = {"ids_small": gen(SMALL, key="small"), "ids_big": gen(BIG, key="big")}
    res["logprobs"] = logprobs
    res["ids_big_first"] = first
    res["workers_before"] = before
    res["workers_after"] = llm.collective_rpc(worker_stats)
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
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        _engine_main(sys.argv[2:])
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))
