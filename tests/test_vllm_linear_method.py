"""The LinearMethod API (``flashcomm.vllm.enable_flashcomm_on_model``) on real vLLM layers.

A small sequence-parallel block written the way that API expects: each rank holds its
token shard ``[c, H]`` (rows ``[r*c, r*c + c)``, ``c = ceil(n / tp)``, zeros past n),
a vLLM ``QKVParallelLinear`` (with bias) and ``MergedColumnParallelLinear`` all-gather
it fused with their GEMM (``ag_gemm``), a SiLU-mul runs on the column shards and a
``RowParallelLinear`` reduce-scatters back to the token shard (``gemm_rs``). vLLM's own
layers are built under a real ``VllmConfig`` in a real vLLM TP group (over the ranks'
gloo world), their weights loaded through vLLM's ``weight_loader``s from dense weights,
and the result compared with the same block computed densely on one process, FP and
compressed-tensors W8A8 (dynamic per-token and static per-tensor activations).

Skipped (with the reason) when vLLM is not importable.
"""

from __future__ import annotations


import pytest
import torch

from _cases import rank_and_size
from _isa import LOWER_VIEWS, in_child, rerun_module_in_view
from flashcomm.tools.testing import RankPools

try:
    import vllm  # noqa: F401
    _MISSING = None
except Exception as e:  # ImportError, or a broken install
    _MISSING = f"vLLM is not importable ({type(e).__name__}: {e}); pip install -e .[vllm]"

if _MISSING is None:
    from flashcomm.vllm.standalone import destroy_vllm_tp, init_vllm_tp, vllm_tp_transport

pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

TPS = [1, 2]
TOKENS = [1, 5, 33]
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 4, 2, 16
THRESHOLD = 8  # the compact ops pipeline above 8 tokens: both strategies run


def _w8a8_config(act: str):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors \
        import CompressedTensorsConfig
    import importlib.util
    import pathlib
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "make_tiny_checkpoint", root / "scripts" / "make_tiny_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_tiny_checkpoint", mod)
    spec.loader.exec_module(mod)
    return CompressedTensorsConfig.from_config(mod.w8a8_quant_config(act))


@pytest.fixture(scope="module")
def vllm_ranks():
    """``vllm_ranks(tp)``: rank pools of this module only (vLLM's process-global state
    stays out of the other tests' ranks), torn down at the end of the module."""
    pools = RankPools(teardown=destroy_vllm_tp)
    try:
        yield pools
    finally:
        pools.close()


def _dense_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM

    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    return {"q": w(q, HIDDEN), "k": w(kv, HIDDEN), "v": w(kv, HIDDEN),
            "q_bias": w(q), "k_bias": w(kv), "v_bias": w(kv),
            "gate": w(INTER, HIDDEN), "up": w(INTER, HIDDEN), "down": w(HIDDEN, INTER)}


def _quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def _reference(x: torch.Tensor, wts: dict, w8a8: str | None,
               static_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense on one process: (qkv [n, q+2kv], mlp out [n, H])."""
    def lin(a, name, bias=None):
        w = wts[name]
        if w8a8:
            q, s = _quantize_per_channel(w)
            w = q.float() * s
            if static_scale is not None:
                a = (a / static_scale).round().clamp(-128, 127) * static_scale
            else:
                sa = a.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
                a = (a / sa).round().clamp(-128, 127) * sa
        out = a.double() @ w.double().t()
        return (out if bias is None else out + bias.double()).float()
    qkv = torch.cat([lin(x, "q", wts["q_bias"]), lin(x, "k", wts["k_bias"]),
                     lin(x, "v", wts["v_bias"])], dim=1)
    gate, up = lin(x, "gate"), lin(x, "up")
    act = torch.nn.functional.silu(gate) * up
    return qkv, lin(act, "down")


def _load(layer, param: str, tensor: torch.Tensor, shard_id=None) -> None:
    p = getattr(layer, param)
    loader = p.weight_loader
    if shard_id is None:
        loader(p, tensor)
    else:
        loader(p, tensor, shard_id)


def _sp_block_case(n: int, w8a8: str | None, num_tokens_mode: str,
                   enabled: bool) -> dict:
    """On every rank: build, load, convert and run the SP block; return this rank's
    token-shard output and the column outputs for comparison with the reference."""
    import torch.distributed as dist
    import flashcomm
    from flashcomm.vllm.linear_method import (FlashcommLinearMethod,
                                              FlashcommW8A8LinearMethod,
                                              enable_flashcomm_on_model)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear,
                                                   QKVParallelLinear, RowParallelLinear)
    init_vllm_tp()
    rank, tp = rank_and_size()
    static_scale = 0.05 if w8a8 == "static" else None
    qc = _w8a8_config(w8a8) if w8a8 else None
    wts = _dense_weights(seed=1234)
    x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n))

    with set_current_vllm_config(VllmConfig()):
        block = torch.nn.ModuleDict({
            "qkv": QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=True,
                                     quant_config=qc, prefix="qkv",
                                     params_dtype=torch.float32),
            "gate_up": MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False,
                                                  quant_config=qc, prefix="gate_up",
                                                  params_dtype=torch.float32),
            "down": RowParallelLinear(INTER, HIDDEN, bias=False, input_is_parallel=True,
                                      quant_config=qc, prefix="down",
                                      params_dtype=torch.float32),
        })
        num_tokens_fn = (lambda _x: n) if num_tokens_mode == "true" else None
        converted = enable_flashcomm_on_model(block, threshold=THRESHOLD, enabled=enabled,
                                              num_tokens_fn=num_tokens_fn)
        want = FlashcommW8A8LinearMethod if w8a8 else FlashcommLinearMethod
        assert all(isinstance(m.quant_method, want) for m in block.values())
        assert not block["down"].reduce_results  # gemm_rs reduces

        # vLLM's weight loaders take the dense checkpoint tensors and shard them.
        for shard, name in (("q", "q"), ("k", "k"), ("v", "v")):
            w = wts[name]
            if w8a8:
                q, s = _quantize_per_channel(w)
                _load(block["qkv"], "weight", q, shard)
                _load(block["qkv"], "weight_scale", s, shard)
            else:
                _load(block["qkv"], "weight", w, shard)
            _load(block["qkv"], "bias", wts[name + "_bias"], shard)
        for shard, name in ((0, "gate"), (1, "up")):
            if w8a8:
                q, s = _quantize_per_channel(wts[name])
                _load(block["gate_up"], "weight", q, shard)
                _load(block["gate_up"], "weight_scale", s, shard)
            else:
                _load(block["gate_up"], "weight", wts[name], shard)
        if w8a8:
            q, s = _quantize_per_channel(wts["down"])
            _load(block["down"], "weight", q)
            _load(block["down"], "weight_scale", s)
        else:
            _load(block["down"], "weight", wts["down"])
        if static_scale is not None:
            for lname, shards in (("qkv", ("q", "k", "v")), ("gate_up", (0, 1))):
                for sid in shards:
                    _load(block[lname], "input_scale", torch.tensor([static_scale]), sid)
            _load(block["down"], "input_scale", torch.tensor([static_scale]))
        for m in block.values():
            m.quant_method.process_weights_after_loading(m)

        flashcomm.reset_stats()
        c = -(-n // tp)
        x_shard = torch.zeros(c, HIDDEN)
        lo, hi = min(rank * c, n), min(rank * c + c, n)
        x_shard[: hi - lo] = x[lo:hi]
        with torch.inference_mode():
            qkv, _ = block["qkv"](x_shard)
            gate_up, _ = block["gate_up"](x_shard)
            g, u = gate_up.chunk(2, dim=-1)
            out_shard, _ = block["down"](torch.nn.functional.silu(g) * u)
        stats = flashcomm.stats()

    qkv_full, mlp_full = _reference(x, wts, w8a8, static_scale)
    rows = n if num_tokens_mode == "true" else c * tp
    # Column outputs: all tokens, this rank's slice of the output features.
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qs, kvs = q // tp, kv // tp
    cols = torch.cat([qkv_full[:, rank * qs:(rank + 1) * qs],
                      qkv_full[:, q + rank * kvs:q + (rank + 1) * kvs],
                      qkv_full[:, q + kv + rank * kvs:q + kv + (rank + 1) * kvs]], dim=1)
    dist.barrier()
    return {"converted": converted, "qkv_shape": tuple(qkv.shape), "rows": rows,
            "qkv_err": (qkv[:n] - cols).abs().max().item(),
            "out_shape": tuple(out_shard.shape), "c": c,
            "out_err": (out_shard[: hi - lo] - mlp_full[lo:hi]).abs().max().item()
            if hi > lo else 0.0,
            "ref_scale": mlp_full.abs().max().item(), "stats": stats}


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("num_tokens_mode", ["padded", "true"])
@pytest.mark.parametrize("w8a8", [None, "dynamic", "static"])
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("tp", TPS)
def test_sp_block_matches_dense(vllm_ranks, tp, n, w8a8, num_tokens_mode, enabled):
    res = vllm_ranks(tp).run(_sp_block_case, n, w8a8, num_tokens_mode, enabled)
    # W8A8: the reference quantises the same way (per-channel weights, per-token or
    # per-tensor activations) in float64. The QKV input is x itself, so only the fp32
    # accumulation order differs; the down projection quantises an activation computed
    # in fp32 on both sides, where a one-ulp difference may move a value across a
    # rounding boundary (one int8 step), hence 3% of the output scale there.
    tol = 1e-4 if w8a8 is None else 2e-3
    out_tol = tol if w8a8 is None else 3e-2
    for r in res:
        assert r["converted"] == 3
        assert r["qkv_shape"] == (r["rows"], (HEADS + 2 * KV_HEADS) * HEAD_DIM // tp)
        assert r["out_shape"] == (r["c"], HIDDEN)
        assert r["qkv_err"] < tol * max(1.0, r["ref_scale"]), r
        assert r["out_err"] < out_tol * max(1.0, r["ref_scale"]), r
        suffix = "_w8a8" if w8a8 else ""
        st = r["stats"]
        strategy = "pipelined" if (enabled and tp > 1 and n > THRESHOLD) else "sequential"
        other = "sequential" if strategy == "pipelined" else "pipelined"
        assert st["ag_gemm" + suffix][strategy] == 2 and st["ag_gemm" + suffix][other] == 0
        # gemm_rs sees the column shard's token count (all gathered rows).
        rs_n = r["rows"]
        rs_strategy = "pipelined" if (enabled and tp > 1 and rs_n > THRESHOLD) else \
            "sequential"
        assert st["gemm_rs" + suffix][rs_strategy] == 1, st


def _refuse_processed_case() -> str:
    from flashcomm.vllm.linear_method import enable_flashcomm_on_model
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear
    init_vllm_tp()
    with set_current_vllm_config(VllmConfig()):
        layer = RowParallelLinear(32, 16, bias=False, params_dtype=torch.float32)
        layer.quant_method.process_weights_after_loading(layer)  # vLLM's CPU repack
        try:
            enable_flashcomm_on_model(torch.nn.ModuleDict({"down": layer}))
        except ValueError as e:
            return str(e)
    return "accepted"


def test_refuses_after_weights_processed(vllm_ranks):
    # vLLM's CPU process_weights_after_loading repacks the weight for oneDNN and empties
    # layer.weight: converting then would run on nothing.
    for m in vllm_ranks(2).run(_refuse_processed_case):
        assert "before the weights are processed" in m, m


# ---------------------------------------------------------------------------------------
# All-reduce provider: the replicated path through vLLM's own communicator
# ---------------------------------------------------------------------------------------

def _all_reduce_provider_case(n: int, provider: str) -> dict:
    """sp_row_linear (replicated) with the group's all-reduces through vLLM's
    ``vllm::all_reduce`` ("vllm"), through flashcomm's transport ("none"), or with only rank 0
    naming the provider ("rank0": the ranks must refuse at the group's next use)."""
    import flashcomm
    from torch.profiler import ProfilerActivity, profile
    from vllm.distributed import get_tp_group
    init_vllm_tp()
    rank, tp = rank_and_size()
    group = get_tp_group()
    gname = group.device_group.group_name
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(n, 8 * tp, generator=g), torch.randn(24, 8 * tp, generator=g)
    x_r, w_r = x[:, rank * 8:(rank + 1) * 8], w[:, rank * 8:(rank + 1) * 8].contiguous()
    if provider == "vllm" or (provider == "rank0" and rank == 0):
        flashcomm.set_all_reduce_provider(gname, "vllm::all_reduce", group.unique_name)
    res = {"provider": flashcomm.all_reduce_provider(gname)}
    try:
        flashcomm.reset_stats()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = torch.ops.flashcomm.sp_row_linear(x_r.contiguous(), w_r, None, gname,
                                                    1000, True, -1)
    except RuntimeError as e:
        return {**res, "error": str(e).split("\n")[0]}
    finally:
        flashcomm.clear_all_reduce_provider(gname)
    names = {e.name for e in prof.events()}
    return {**res, "transport": vllm_tp_transport(),
            "flashcomm_transport": flashcomm.transport(gname),
            "err": (out.double() - x.double() @ w.double().t()).abs().max().item(),
            "vllm_all_reduce": "vllm::all_reduce" in names,
            "c10d_allreduce": any(name.startswith("c10d::allreduce") for name in names),
            "replicated": flashcomm.stats()["sp_row_linear"]["replicated"]}


def vllm_cpu_all_reduce_expected() -> str:
    """What vLLM's TP all-reduce is on this CPU (or view): its shared-memory communicator
    where the ``_C`` library it loaded has one (AVX512 builds), else torch.distributed
    (its AVX2 build has none, so it falls back to the group's gloo)."""
    import vllm._custom_ops  # noqa: F401  (loads the _C library vLLM picks for this CPU)
    return "cpu-shm" if hasattr(torch.ops._C, "init_shm_manager") else "torch.distributed"


@pytest.mark.parametrize("provider", ["vllm", "none"])
def test_all_reduce_provider_routes_replicated_calls(vllm_ranks, provider):
    expected = vllm_cpu_all_reduce_expected()
    print(f"\nvLLM's CPU all-reduce here: {expected}")
    for r in vllm_ranks(2).run(_all_reduce_provider_case, 4, provider):
        assert r["err"] < 1e-4 and r["replicated"] == 1, r
        assert r["transport"] == expected, r
        if provider == "vllm":
            assert r["provider"].startswith("vllm::all_reduce(tp"), r
            assert r["vllm_all_reduce"], r
            # vLLM's shared-memory all-reduce issues no c10d collective; its gloo one does.
            assert r["c10d_allreduce"] == (expected != "cpu-shm"), r
        else:  # flashcomm's own transport: shared memory here (c10d if forced)
            assert r["provider"] == "", r
            assert not r["vllm_all_reduce"], r
            assert r["c10d_allreduce"] == (r["flashcomm_transport"] == "c10d"), r


# The CPU classes whose vLLM build has another all-reduce than this machine's (AVX2: gloo).
COMM_VIEWS = [v for v in LOWER_VIEWS if v == "avx2"]
_CHILD_ENV = "FLASHCOMM_VLLM_LM_VIEW_CHILD"


@pytest.mark.parametrize("view", COMM_VIEWS)
def test_all_reduce_provider_in_cpu_view(view):
    """The provider test again in a child that sees ``view``, where vLLM loads another
    ``_C`` library and so another CPU all-reduce."""
    if in_child(_CHILD_ENV):
        pytest.skip("runs in the parent process only")
    out = rerun_module_in_view(__file__, view, _CHILD_ENV,
                               "not all_reduce_provider_routes or cpu_view", 1)
    assert "2 passed" in out, out[-2000:]


def test_all_reduce_provider_must_agree(vllm_ranks):
    for r in vllm_ranks(2).run(_all_reduce_provider_case, 4, "rank0"):
        assert "disagree" in r.get("error", ""), r
        assert "all-reduce provider of the group" in r["error"], r
