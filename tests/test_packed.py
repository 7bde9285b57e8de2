"""Packed weights (flashcomm.weights.prepare_linear) in every linear op.

* Packed == plain: every op (compact and layout-invariant, FP and W8A8), every
  dtype, tp = 1 and 2, both strategies (the pipelined one with several chunks, each
  reusing the packed weight); FP within the output dtype's tolerance of each other
  and of the float64 reference, W8A8 bitwise (exact int32 GEMM, same dequantisation).
* Compile safety: torch.compile (fullgraph, dynamic n) traces one graph with a
  packed weight as a graph input; torch.library.opcheck's AOT-dispatch checks pass
  on packed FP samples; the Meta kernels give the real kernels' shape / dtype for
  packed weights under FakeTensorMode.
* Memory: after DecoderModel.prepare() the model references no plain copy of a
  packed weight (the plain tensors are freed) and its outputs are unchanged.
* The prepare step itself: sizes and dtype reported, what is left plain, errors.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import flashcomm
from flashcomm.tools.models import TINY, DecoderModel
from flashcomm.tools.reference import (feature_slice, quantize_weight_per_channel, relative_error,
                                       token_shard)
from flashcomm.weights import is_packed, packing_supported, packs_by_default, prepare_linear

from _cases import RTOL, rank_and_size
from _isa import LOWER_VIEWS, check_requested_view_is_active, in_child, rerun_module_in_view

K, N = 64, 48
FP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP_OPS = ["gemm_rs", "ag_gemm", "sp_row_linear", "sp_column_linear"]
W8A8_OPS = ["gemm_rs_w8a8", "ag_gemm_w8a8", "sp_row_linear_w8a8", "sp_column_linear_w8a8"]
# (compact threshold, sp_threshold): pipelined in sharded mode, sequential in
# sharded mode, and replicated (sp ops; the compact ops run sequential).
STRATEGIES = {"pipelined": (0, 0), "sequential": (10**9, 0), "replicated": (10**9, 10**9)}
TP_STRATEGIES = [(1, "replicated"), (2, "pipelined"), (2, "sequential"), (2, "replicated")]
TOKEN_COUNTS = [1, 7, 130]
# Pipelined chunking that cuts even small rank blocks into several chunks.
CHUNKS = (4, 2)
W8A8_MODES = ["dynamic", "static_asym", "int8_per_token"]


def skip_unless_packs(dtype: torch.dtype) -> None:
    if not packing_supported(dtype):
        pytest.skip(f"this CPU cannot pack {dtype} weights")


# --- worker side ---------------------------------------------------------------

def _weight_slice(op: str, w_full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    row_parallel = op.startswith(("gemm_rs", "sp_row"))
    return feature_slice(w_full, tp, rank, dim=1 if row_parallel else 0)


def _call(op: str, x_full, w, w_scale, scale, zp, bias, out_dtype, threshold, sp_threshold):
    """One call of `op` on this rank with its slices; returns this rank's output."""
    rank, tp = rank_and_size()
    n = x_full.shape[0]
    col_bias = None if bias is None else feature_slice(bias, tp, rank, dim=0)
    if op in ("gemm_rs", "gemm_rs_w8a8", "sp_row_linear", "sp_row_linear_w8a8"):
        x = feature_slice(x_full, tp, rank, dim=1)
        if op == "gemm_rs":
            return flashcomm.gemm_rs(x, w, bias, None, threshold)
        if op == "gemm_rs_w8a8":
            return flashcomm.gemm_rs_w8a8(x, w, w_scale, scale, zp, bias, None, out_dtype,
                                          threshold)
        if op == "sp_row_linear":
            return flashcomm.sp_row_linear(x, w, bias, None, sp_threshold, True, threshold)
        return flashcomm.sp_row_linear_w8a8(x, w, w_scale, scale, zp, bias, None, out_dtype,
                                            sp_threshold, True, threshold)
    w_s = w_scale if w_scale is None or w_scale.numel() == 1 else feature_slice(w_scale, tp,
                                                                                rank, dim=0)
    if op in ("ag_gemm", "ag_gemm_w8a8"):
        x = token_shard(x_full, tp, rank)
        if scale is not None and scale.dim() == 2:
            scale = token_shard(scale, tp, rank)
        if op == "ag_gemm":
            return flashcomm.ag_gemm(x, w, col_bias, None, n, threshold, True, True)
        return flashcomm.ag_gemm_w8a8(x, w, w_s, scale, zp, col_bias, None, n, out_dtype,
                                      threshold, True, True)
    if op == "sp_column_linear":
        return flashcomm.sp_column_linear(x_full, w, col_bias, None, sp_threshold, True,
                                          threshold, True)
    return flashcomm.sp_column_linear_w8a8(x_full, w, w_s, scale, zp, col_bias, None, out_dtype,
                                           sp_threshold, True, threshold, True)


def _plain_and_packed_on_rank(op, x_full, w_full, w_scale, scale, zp, bias, out_dtype,
                              threshold, sp_threshold):
    """(plain output, packed output, counters of the packed call). Packing happens
    here: a packed weight cannot be pickled to a rank."""
    rank, tp = rank_and_size()
    w = _weight_slice(op, w_full, tp, rank)
    packed = prepare_linear(w, pack=True)
    assert is_packed(packed) and packed.shape == w.shape and packed.dtype == w.dtype
    saved = flashcomm.get_pipeline_config()
    flashcomm.set_pipeline_config(*CHUNKS)
    try:
        plain_out = _call(op, x_full, w, w_scale, scale, zp, bias, out_dtype, threshold,
                          sp_threshold)
        flashcomm.reset_stats()
        packed_out = _call(op, x_full, packed, w_scale, scale, zp, bias, out_dtype, threshold,
                           sp_threshold)
        counts = flashcomm.stats()
    finally:
        flashcomm.set_pipeline_config(*saved)
    return plain_out, packed_out, counts


def _full_result(op: str, outs: list[torch.Tensor], n: int, tp: int) -> torch.Tensor:
    """The [n, N] result from the per-rank outputs: gemm_rs blocks concatenated,
    sp_row_linear's owned rows (every row when replicated), the gathered column
    ops' rank-0 output."""
    if op.startswith("gemm_rs"):
        return torch.cat(outs)[:n]
    if op.startswith("sp_row"):
        return torch.cat([out[slice(*flashcomm.owned_rows(n, tp, r))]
                          for r, out in enumerate(outs)])
    return outs[0]


def _replicated(op: str, n: int, tp: int, sp_threshold: int) -> bool:
    return op.startswith("sp_") and flashcomm.sp_mode(n, tp, sp_threshold) == "replicated"


# --- packed == plain -------------------------------------------------------------

@pytest.mark.parametrize("dtype", FP_DTYPES)
@pytest.mark.parametrize("op", FP_OPS)
@pytest.mark.parametrize("tp,strategy", TP_STRATEGIES)
def test_fp_packed_matches_plain(ranks, tp, strategy, op, dtype):
    skip_unless_packs(dtype)
    threshold, sp_threshold = STRATEGIES[strategy]
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    for n in TOKEN_COUNTS:
        x = torch.randn(n, K, generator=g).to(dtype)
        results = ranks(tp).run(_plain_and_packed_on_rank, op, x, w, None, None, None, bias,
                                dtype, threshold, sp_threshold)
        plain = _full_result(op, [r[0] for r in results], n, tp)
        packed = _full_result(op, [r[1] for r in results], n, tp)
        want = x.double() @ w.double().t() + bias.double()
        context = (op, tp, dtype, strategy, n)
        assert packed.shape == (n, N) and packed.dtype == dtype, context
        assert relative_error(packed, want) <= RTOL[dtype], context
        assert relative_error(packed, plain.double()) <= RTOL[dtype], context
        if strategy == "pipelined" and not _replicated(op, n, tp, sp_threshold):
            compact = "ag_gemm" if "column" in op or op.startswith("ag") else "gemm_rs"
            assert all(r[2][compact]["pipelined"] == 1 for r in results), context


def _w8a8_inputs(mode: str, n: int, g: torch.Generator):
    x = torch.randn(n, K, generator=g)
    scale = zp = None
    if mode == "static_asym":
        scale, zp = torch.tensor([0.03]), torch.tensor([5], dtype=torch.int32)
    if mode == "int8_per_token":
        x = torch.randint(-128, 128, (n, K), generator=g, dtype=torch.int8)
        scale = torch.rand(n, 1, generator=g) * 0.05
    return x, scale, zp


@pytest.mark.parametrize("mode", W8A8_MODES)
@pytest.mark.parametrize("op", W8A8_OPS)
@pytest.mark.parametrize("tp,strategy", TP_STRATEGIES)
def test_w8a8_packed_matches_plain_bitwise(ranks, tp, strategy, op, mode):
    skip_unless_packs(torch.int8)
    threshold, sp_threshold = STRATEGIES[strategy]
    g = torch.Generator().manual_seed(12)
    w_q, w_scale = quantize_weight_per_channel(torch.randn(N, K, generator=g))
    bias = torch.randn(N, generator=g)
    for n in TOKEN_COUNTS:
        x, scale, zp = _w8a8_inputs(mode, n, g)
        results = ranks(tp).run(_plain_and_packed_on_rank, op, x, w_q, w_scale, scale, zp, bias,
                                torch.bfloat16, threshold, sp_threshold)
        plain = _full_result(op, [r[0] for r in results], n, tp)
        packed = _full_result(op, [r[1] for r in results], n, tp)
        assert packed.shape == (n, N) and packed.dtype == torch.bfloat16
        torch.testing.assert_close(packed, plain, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{op} {tp} {mode} {strategy} {n}: {m}")


# --- compile safety --------------------------------------------------------------

def _compile_on_rank(dtype):
    """One compiled function over a packed weight for several n: graphs traced,
    and whether every compiled result equals the eager one."""
    from torch._dynamo.decorators import mark_unbacked

    g = torch.Generator().manual_seed(13)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    if dtype == torch.int8:
        w, w_scale = quantize_weight_per_channel(torch.randn(N, K, generator=g))
        packed = prepare_linear(w, pack=True)

        def fn(x, weight):
            return (flashcomm.gemm_rs_w8a8(x, weight, w_scale, None, None, None, None,
                                           torch.bfloat16, 0),
                    flashcomm.sp_column_linear_w8a8(x, weight, w_scale, out_dtype=torch.float32,
                                                    sp_threshold=0))
    else:
        packed = prepare_linear((torch.randn(N, K, generator=g) / K**0.5).to(dtype), pack=True)

        def fn(x, weight):
            return (flashcomm.gemm_rs(x, weight, None, None, 0),
                    flashcomm.sp_column_linear(x, weight, None, None, 0))

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)
    same = []
    for n in (3, 17, 40, 1):
        x = torch.randn(n, K, generator=g).to(torch.float32 if dtype == torch.int8 else dtype)
        mark_unbacked(x, 0)  # n = 1 included: no size-1 specialisation
        got, want = compiled(x, packed), fn(x, packed)
        same.append(all(a.shape == b.shape and bool(torch.equal(a, b))
                        for a, b in zip(got, want)))
    return len(compiles), same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("tp", [1, 2])
def test_compile_with_packed_weight_traces_one_graph(ranks, tp, dtype):
    skip_unless_packs(dtype)
    for graphs, same in ranks(tp).run(_compile_on_rank, dtype, timeout_s=600):
        assert graphs == 1, f"{graphs} graphs traced"
        assert all(same), same


def _opcheck_on_rank(dtype):
    """opcheck's AOT-dispatch checks on packed FP samples, and the Meta kernels
    under FakeTensorMode against the real kernels, for every op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, tp = rank_and_size()
    name = flashcomm.group_name(None)
    g = torch.Generator().manual_seed(14)
    fp = dtype != torch.int8
    w = torch.randn(N, K, generator=g)
    w_scale = None
    if fp:
        w = w.to(dtype)
    else:
        w, w_scale = quantize_weight_per_channel(w)
    packed = prepare_linear(w, pack=True)
    bias = torch.randn(N, generator=g).to(dtype if fp else torch.float32)
    checked = 0
    for n in (0, 1, 37):
        c = -(-n // tp)
        x_rows = torch.randn(n, K, generator=g).to(dtype if fp else torch.float32)
        x_shard = torch.randn(c, K, generator=g).to(x_rows.dtype)
        if fp:
            samples = [(torch.ops.flashcomm.gemm_rs.default, (x_rows, packed, bias, name), {}),
                       (torch.ops.flashcomm.ag_gemm.default, (x_shard, packed, None, name, n),
                        {"threshold": 0}),
                       # Replicated: a sharded sp_row_linear leaves don't-care rows,
                       # which opcheck would compare.
                       (torch.ops.flashcomm.sp_row_linear.default, (x_rows, packed, bias, name),
                        {}),
                       (torch.ops.flashcomm.sp_column_linear.default,
                        (x_rows, packed, None, name), {"gather_output": True})]
        else:
            out = torch.bfloat16
            samples = [(torch.ops.flashcomm.gemm_rs_w8a8.default,
                        (x_rows, packed, w_scale, None, None, bias, name, out), {}),
                       (torch.ops.flashcomm.ag_gemm_w8a8.default,
                        (x_shard, packed, w_scale, None, None, None, name, n, out),
                        {"threshold": 0}),
                       (torch.ops.flashcomm.sp_row_linear_w8a8.default,
                        (x_rows, packed, w_scale, None, None, bias, name, out),
                        {"sp_threshold": 0}),
                       (torch.ops.flashcomm.sp_column_linear_w8a8.default,
                        (x_rows, packed, w_scale, None, None, None, name, out), {})]
        for op, args, kwargs in samples:
            real = op(*args, **kwargs)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                             for a in args]
                fake = op(*fake_args, **kwargs)
            assert (fake.shape, fake.dtype, fake.device) == (real.shape, real.dtype,
                                                             real.device), op
            if fp:
                # The AOT-dispatch checks clone inputs with torch.clone, which keeps
                # a packed FP weight intact. (opcheck's other checks copy every
                # tensor input through data_ptr(), which no opaque tensor has; the
                # fake-tensor comparison above covers the Meta kernels instead.)
                result = torch.library.opcheck(
                    op, args, kwargs,
                    test_utils=("test_aot_dispatch_static", "test_aot_dispatch_dynamic"))
                assert all(v == "SUCCESS" for v in result.values()), (op, result)
            checked += 1
    return checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("tp", [1, 2])
def test_opcheck_and_meta_with_packed_samples(ranks, tp, dtype):
    skip_unless_packs(dtype)
    counts = ranks(tp).run(_opcheck_on_rank, dtype, timeout_s=600)
    assert counts[0] > 0 and len(set(counts)) == 1


# --- the prepare step and memory -------------------------------------------------

def _storages(model: torch.nn.Module) -> set[int]:
    """data_ptr of the storage of every plain tensor the model references: its
    buffers and parameters, and tensors held as plain attributes."""
    ptrs = set()
    tensors = list(model.buffers()) + list(model.parameters())
    for module in model.modules():
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if not t.is_mkldnn:
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def _prepared_model_on_rank(w8a8, dtype):
    """Checks, on this rank, that DecoderModel.prepare() swaps every linear weight for
    its packed form and drops the plain one, and that the prepared model compiles;
    returns the logits before and after."""
    model = DecoderModel(TINY, "flashcomm", w8a8=w8a8, dtype=dtype).eval()
    ids = torch.arange(9) % TINY.vocab_size
    with torch.no_grad():
        before = model(ids)
    linears = [m for m in model.modules() if type(m).__name__ == "_Linear"]
    plain_refs = [weakref.ref(m.weight) for m in linears]
    plain_ptrs = {m.weight.untyped_storage().data_ptr() for m in linears}
    assert model.prepare(pack=True) is model
    gc.collect()
    packed = [m.weight for m in linears]
    assert all(is_packed(w) for w in packed)
    assert all(ref() is None for ref in plain_refs), "a plain weight is still alive"
    assert not plain_ptrs & _storages(model), "the model still references a plain weight"
    with torch.no_grad():
        after = model(ids)
        # The prepared model compiles (packed buffers as graph inputs) to the same result.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
        assert torch.equal(compiled(ids), after)
    return before, after


@pytest.mark.parametrize("w8a8,dtype", [(False, torch.bfloat16), (False, torch.float32),
                                        (True, torch.float32)])
def test_decoder_prepare_replaces_plain_weights(ranks, w8a8, dtype):
    skip_unless_packs(dtype)
    if w8a8:
        skip_unless_packs(torch.int8)
    for before, after in ranks(2).run(_prepared_model_on_rank, w8a8, dtype):
        assert relative_error(after, before.double()) <= RTOL[dtype]


def test_prepare_reports_sizes_and_dtype():
    for dtype in FP_DTYPES + [torch.int8]:
        if not packing_supported(dtype):
            continue
        w = torch.randn(N, K).to(dtype) if dtype != torch.int8 else torch.ones(N, K, dtype=dtype)
        p = prepare_linear(w, pack=True)
        assert is_packed(p) and p.shape == (N, K) and p.dtype == dtype and p.device == w.device
        assert prepare_linear(p) is p  # already packed: unchanged


def test_prepare_leaves_plain_what_does_not_pay():
    """pack=False and unpackable weights come back plain and contiguous; the auto
    choice never packs a dtype this CPU cannot."""
    w = torch.randn(N, K).t()  # non-contiguous
    plain = prepare_linear(w, pack=False)
    assert not is_packed(plain) and plain.is_contiguous() and torch.equal(plain, w)
    empty = prepare_linear(torch.zeros(0, K))
    assert not is_packed(empty) and empty.shape == (0, K)
    for dtype in FP_DTYPES + [torch.int8]:
        for shape in ((N, K), (1536, 512)):
            auto = packs_by_default(dtype, shape)
            assert not auto or packing_supported(dtype)
            if auto and shape == (N, K):  # small enough to prepare here
                assert is_packed(prepare_linear(torch.zeros(shape, dtype=dtype)))
        assert not packs_by_default(dtype, (0, K))


def test_prepare_rejects_bad_weights():
    with pytest.raises(RuntimeError, match=r"prepare_linear_weight: weight must be 2-D \[N, K\]"):
        prepare_linear(torch.zeros(3))
    with pytest.raises(RuntimeError, match="prepare_linear_weight: weight must be float32"):
        prepare_linear(torch.zeros(4, 4, dtype=torch.float64))


def test_packed_weight_is_rejected_by_plain_torch():
    """A packed weight is opaque: plain torch GEMMs refuse it instead of reading
    packed memory as a plain matrix."""
    skip_unless_packs(torch.float32)
    p = prepare_linear(torch.randn(N, K), pack=True)
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(torch.randn(2, K), p)


# --- CPU views: the oneDNN paths of lesser CPUs ---------------------------------------

# AVX2 only (AMD Zen 2/3): oneDNN's int8 GEMM there sums pairs in 16-bit lanes, and there
# is no bf16 packing. (The worst-case packed int8 product in every view:
# tests/test_quant_kernels.py.)
PACKING_VIEWS = [v for v in LOWER_VIEWS if v == "avx2"]
_CHILD_ENV = "FLASHCOMM_PACKED_VIEW_CHILD"


def test_requested_view_is_active():
    check_requested_view_is_active(_CHILD_ENV)


@pytest.mark.parametrize("view", PACKING_VIEWS)
def test_cpu_view(view):
    """Reruns the W8A8 packed-vs-plain, decoder and prepare tests in a child that sees
    ``view``: what packs there is exact, what cannot be exact is refused. (The FP packed
    GEMMs are oneDNN's fp32 one there, exact as probed.)"""
    if in_child(_CHILD_ENV):
        pytest.skip("runs in the parent process only")
    rerun_module_in_view(__file__, view, _CHILD_ENV,
                         "cpu_view or compile or opcheck or fp_packed_matches_plain", 5)
