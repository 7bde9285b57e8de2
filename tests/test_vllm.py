"""flashcomm's vLLM plugin against the real vLLM (CPU, tp=2 over gloo / SHM).

Each configuration runs ``vllm.LLM`` in its own subprocess
(:func:`flashcomm.tools.vllm_engine.run_engine`; spawn-safe, keeps this process clean),
once with ``FLASHCOMM_ENABLE=1`` and once without, on a tiny checkpoint written by
``scripts/make_tiny_checkpoint.py``.
Greedy decoding of token-id prompts; ``FLASHCOMM_SP_THRESHOLD=16`` so the prefill of
3 prompts x 12 tokens (36 tokens) runs sharded and the decode steps (3 tokens) and a
one-prompt prefill of 8 tokens run replicated. The Mistral test runs the plugin's default,
``sp_threshold=auto``: both workers must log the same measured threshold, and the modes
counted are the ones it implies.

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
  (:data:`flashcomm.tools.vllm_engine.CPU_VIEWS`), in both runs; flashcomm's own
  kernels still run at this CPU's ISA.
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
import re
import sys
from pathlib import Path

import pytest

from _vllm_cases import (ACTIVE, BF16_TIE_NATS, CPU_VIEW, REFUSAL, expected_conversion,
                         missing_modes, requires_vllm)
from flashcomm.tools.vllm_engine import (BIG, CPU_VIEWS, SMALL, SP_THRESHOLD,
                                         make_checkpoint, run_engine)

pytestmark = requires_vllm


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


def measured_threshold(on: dict, log: str) -> int:
    """``sp_threshold=auto``: the threshold both workers measured, checked in their
    ``flashcomm: active`` lines and in what they recorded (the same value on both)."""
    active = [line for line in log.splitlines() if ACTIVE in line]
    assert len(active) == 2, log[-6000:]
    found = {}
    for line in active:
        m = re.search(r"TP rank (\d)/2: .* sp_threshold=(\d+) \(measured in [0-9.]+ s;", line)
        assert m, line
        found[int(m.group(1))] = int(m.group(2))
    assert sorted(found) == [0, 1] and found[0] == found[1], active
    recorded = {w["flashcomm_config"]["sp_threshold"] for w in on["workers_after"]}
    assert recorded == {found[0]}, (recorded, found)
    assert {w["flashcomm_config"]["sp_threshold_requested"] for w in on["workers_after"]} \
        == {"auto"}
    return found[0]


def check_on_off(tmp: Path, model: Path, kind: str, dtype: str = "float32",
                 tie_nats: float | None = None, compile_backend: str = "eager",
                 cpu_view: str = CPU_VIEW, sp_threshold: str = str(SP_THRESHOLD)
                 ) -> tuple[dict, dict]:
    """vLLM with flashcomm off, then on (at ``sp_threshold``), in the same environment.
    ``tie_nats=None``: greedy ids identical; else identical except after near-ties.
    ``kind``: "fp" or "w8a8" (CONVERSION). ``sp_threshold="auto"``: the workers log the
    same measured threshold, and the modes counted are those it implies."""
    lp = tie_nats is not None
    runs, logs = {}, {}
    for enable in (False, True):
        res, log = run_engine(tmp, model, enable=enable, dtype=dtype, logprobs=lp,
                              compile_backend=compile_backend, cpu_view=cpu_view,
                              env={"FLASHCOMM_SP_THRESHOLD": sp_threshold})
        assert res is not None, (f"vLLM run {'with' if enable else 'without'} flashcomm "
                                 f"failed ({dtype}, {compile_backend}, CPU view "
                                 f"{cpu_view or 'real'}):\n{log[-6000:]}")
        runs[enable], logs[enable] = res, log
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
    # The batches of the checked pass: prefills of 8 (SMALL) and 36 (BIG) tokens, decode
    # steps of 1 and 3: sharded above the threshold, replicated up to it.
    threshold = measured_threshold(on, logs[True]) if sp_threshold == "auto" \
        else int(sp_threshold)
    modes = {"sharded" if n > threshold else "replicated" for n in (1, 3, 8, 36)}
    # auto found no batch worth sharding where vLLM's own all-reduce is its shared-memory
    # one: the converted layers run vLLM's own forward (calibration.stand_aside_reason),
    # no flashcomm op is counted, and both workers say so. Which branch ran depends on the
    # CPU (vLLM's AVX2 build all-reduces over gloo: flashcomm stays in the path).
    aside = {bool(w["flashcomm_config"].get("stand_aside")) for w in on["workers_after"]}
    assert len(aside) == 1, on["workers_after"]
    if aside.pop():
        assert sp_threshold == "auto", "stand-aside is for a measured threshold only"
        active = [line for line in logs[True].splitlines() if ACTIVE in line]
        assert all("run vLLM's own forward" in line for line in active), active
        assert all(w["vllm_tp_transport"] == "cpu-shm" for w in on["workers_after"]), \
            on["workers_after"]
        modes = set()
    print(f"{model.name}: sp_threshold {threshold}, modes counted {sorted(modes) or 'none'}",
          file=sys.stderr)
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
        # Every collective, the replicated all-reduces included (the default when the
        # transport is shared memory), goes through flashcomm's shared-memory transport.
        assert after["transport"] == "shm", after
        assert after["all_reduce_provider"] == "", after
        # Counted during the checked generate calls only: batches above and below
        # SP_THRESHOLD ran, so every op group ran in both modes in every worker.
        missing = [m for m in missing_modes(after["stats"], expected)
                   if m.rsplit(" ", 1)[1] in modes]
        assert not missing, (missing, after["stats"])
        counted = {mode for counts in after["stats"].values() for mode, calls in
                   counts.items() if calls and mode in ("replicated", "sharded")}
        assert counted == modes, (threshold, after["stats"])
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
    # sp_threshold=auto (the default): both workers measure the same threshold at
    # start-up, log it, run the modes it implies, and the greedy ids stay identical.
    model = make_checkpoint(tmp_path, "mistral", "--arch", "mistral")
    check_on_off(tmp_path, model, "fp", sp_threshold="auto")


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
