"""Bitwise mode invariance (README, "Numerics across the threshold"): with
``FLASHCOMM_BITWISE_MODES`` on, every layout-invariant op returns bitwise the same rows
whether a call runs sharded or replicated (``enabled=False``), for fp32 / bf16 / fp16
and W8A8, tp = 2, 3 and 4, on both transports, n on both sides of the threshold and
odd n (padding rows; at tp = 4 and n = 5 the last rank owns no rows), with the
pipelined strategy too. Rows compared: those valid in both modes (the owned rows of a
sharded output; every row of an output that gathers). And by default (setting off):
the communication-only ops (the vLLM integration's path) on shm at any tp, and on
c10d at tp = 2."""

from __future__ import annotations

import pytest
import torch

import flashcomm

from _cases import rank_and_size

SP_THRESHOLD = 4
NS = [3, 5, 17, 65, 301]  # 3: replicated in both calls; the rest sharded, odd
THRESHOLD = 64            # pipelined kernel strategy from n = 65 on
K_R, N_OUT = 96, 160      # per-rank features of the row-parallel input, output features
H = 256                   # hidden size (column input, norm)
FP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _owned(n: int) -> tuple[int, int]:
    rank, tp = rank_and_size()
    if flashcomm.sp_mode(n, tp, SP_THRESHOLD) == "replicated":
        return 0, n
    return flashcomm.owned_rows(n, tp, rank)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _int8_weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-127, 128, (rows, cols), generator=_gen(seed), dtype=torch.int8)
    scale = torch.rand(rows, generator=_gen(seed + 1)) * 0.01 + 1e-3
    return w, scale


def _cases() -> list:
    """(name, fn(sp_threshold, enabled) -> tensors, all_rows per tensor)."""
    rank, tp = rank_and_size()
    cases = []
    for dt in FP_DTYPES:
        tag = str(dt).removeprefix("torch.")
        w_row = flashcomm.prepare_linear(_randn((N_OUT, K_R), dt, 10 + rank))
        b_row = _randn((N_OUT,), dt, 20)
        w_col = flashcomm.prepare_linear(_randn((N_OUT, H), dt, 30 + rank))
        b_col = _randn((N_OUT,), dt, 40 + rank)
        w_norm = _randn((H,), dt, 50)

        def row(n, t, e, dt=dt, w=w_row, b=b_row):
            x = _randn((n, K_R), dt, 1000 + 7 * rank + n)
            return (flashcomm.sp_row_linear(x, w, b, None, t, e, THRESHOLD),)

        def col(n, t, e, gather, dt=dt, w=w_col, b=b_col):
            x = _randn((n, H), dt, 2000 + n)
            return (flashcomm.sp_column_linear(x, w, b, None, t, e, THRESHOLD, gather),)

        def norm(n, t, e, gather, inplace, dt=dt, w=w_norm):
            x = _randn((n, H), dt, 3000 + n)
            res = _randn((n, H), dt, 4000 + n)
            if inplace:
                flashcomm.sp_add_rms_norm_(x, res, w, 1e-6, None, t, e, gather)
                return x, res
            return flashcomm.sp_add_rms_norm(x, res, w, 1e-6, None, t, e, gather)

        def reduce(n, t, e, inplace, dt=dt):
            p = _randn((n, H), dt, 5000 + 7 * rank + n)
            if inplace:
                flashcomm.sp_reduce_(p, None, t, e)
                return (p,)
            return (flashcomm.sp_reduce(p, None, t, e),)

        def gather(n, t, e, inplace, dt=dt):
            x = _randn((n, H), dt, 6000 + n)
            if inplace:
                flashcomm.sp_gather_(x, None, t, e)
                return (x,)
            return (flashcomm.sp_gather(x, None, t, e),)

        cases += [
            (f"sp_row_linear {tag}", row, [False]),
            (f"sp_column_linear {tag}", lambda n, t, e, f=col: f(n, t, e, False), [True]),
            (f"sp_column_linear gather_output {tag}", lambda n, t, e, f=col: f(n, t, e, True),
             [True]),
            (f"sp_reduce {tag}", lambda n, t, e, f=reduce: f(n, t, e, False), [False]),
            (f"sp_reduce_ {tag}", lambda n, t, e, f=reduce: f(n, t, e, True), [False]),
            (f"sp_gather {tag}", lambda n, t, e, f=gather: f(n, t, e, False), [True]),
            (f"sp_gather_ {tag}", lambda n, t, e, f=gather: f(n, t, e, True), [True]),
        ]
        for g in (False, True):
            cases += [
                (f"sp_add_rms_norm gather={g} {tag}",
                 lambda n, t, e, f=norm, g=g: f(n, t, e, g, False), [g, False]),
                (f"sp_add_rms_norm_ gather={g} {tag}",
                 lambda n, t, e, f=norm, g=g: f(n, t, e, g, True), [g, False]),
            ]
    w_row_q, s_row = _int8_weight(N_OUT, K_R, 70 + rank)
    w_row_q = flashcomm.prepare_linear(w_row_q)
    w_col_q, s_col = _int8_weight(N_OUT, H, 80 + rank)
    w_col_q = flashcomm.prepare_linear(w_col_q)
    static = (torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32))
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(out_dtype).removeprefix("torch.")
        for kind, (scale, zp) in (("dynamic", (None, None)), ("static", static)):
            def row8(n, t, e, od=out_dtype, s=scale, z=zp):
                x = _randn((n, K_R), od, 7000 + 7 * rank + n)
                return (flashcomm.sp_row_linear_w8a8(x, w_row_q, s_row, s, z, None, None, od,
                                                     t, e, THRESHOLD),)

            def col8(n, t, e, gather, od=out_dtype, s=scale, z=zp):
                x = _randn((n, H), od, 8000 + n)
                return (flashcomm.sp_column_linear_w8a8(x, w_col_q, s_col, s, z, None, None, od,
                                                        t, e, THRESHOLD, gather),)

            cases += [
                (f"sp_row_linear_w8a8 {kind} {tag}", row8, [False]),
                (f"sp_column_linear_w8a8 {kind} {tag}",
                 lambda n, t, e, f=col8: f(n, t, e, False), [True]),
                (f"sp_column_linear_w8a8 {kind} gather_output {tag}",
                 lambda n, t, e, f=col8: f(n, t, e, True), [True]),
            ]
    return cases


def _compare(only_communication: bool) -> list[str]:
    """Every case and n: the call with sp_threshold = SP_THRESHOLD against the same call
    with enabled=False, bitwise on the rows valid in both. Returns the differences."""
    failures = []
    for name, fn, all_rows in _cases():
        if only_communication and not name.startswith(("sp_reduce", "sp_gather",
                                                          "sp_add_rms_norm")):
            continue
        for n in NS:
            sharded = fn(n, SP_THRESHOLD, True)
            replicated = fn(n, SP_THRESHOLD, False)
            lo, hi = _owned(n)
            for i, (a, b, every) in enumerate(zip(sharded, replicated, all_rows)):
                rows = slice(0, n) if every else slice(lo, hi)
                if not torch.equal(a[rows], b[rows]):
                    diff = (a[rows].double() - b[rows].double()).abs().max().item()
                    failures.append(f"{name} n={n} output {i}: max |diff| {diff:.3g}")
    return failures


def _on_rank(bitwise: bool, only_communication: bool) -> list[str]:
    before = flashcomm.bitwise_modes()
    flashcomm.init(bitwise_modes=bitwise)
    try:
        return _compare(only_communication)
    finally:
        flashcomm.init(bitwise_modes=before)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_every_op_bitwise_equal_in_both_modes(ranks, tp):
    failures = ranks(tp).run(_on_rank, True, False, timeout_s=600)
    assert failures == [[] for _ in range(tp)], failures


@pytest.mark.parametrize("tp", [2, 4])
def test_communication_ops_bitwise_equal_by_default(ranks, transport, tp):
    """What the vLLM integration calls (sp_reduce_, sp_add_rms_norm_, sp_gather_) needs
    no setting where the sums cannot change order: shm at any tp, c10d at tp = 2."""
    if transport == "c10d" and tp > 2:
        pytest.skip("c10d at tp >= 3 sums in another order unless FLASHCOMM_BITWISE_MODES=1")
    failures = ranks(tp).run(_on_rank, False, True, timeout_s=600)
    assert failures == [[] for _ in range(tp)], failures


_PROVIDER_CALLS = [0]
_PROVIDER_LIBS: list = []


def _define_reversed_provider() -> str:
    """An all-reduce provider with vLLM's schema that sums in reverse rank order (so, at
    tp >= 3, in another order than either transport's reduce-scatter)."""
    import torch.distributed as dist
    if not _PROVIDER_LIBS:
        lib = torch.library.Library("fc_invariance_test", "DEF")
        lib.define("all_reduce(Tensor tensor, str group_name) -> Tensor")

        def impl(t: torch.Tensor, group_name: str) -> torch.Tensor:
            _PROVIDER_CALLS[0] += 1
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, t.contiguous())
            out = parts[-1].clone()
            for part in reversed(parts[:-1]):
                out += part
            return out

        lib.impl("all_reduce", impl, "CompositeExplicitAutograd")
        _PROVIDER_LIBS.append(lib)
    return "fc_invariance_test::all_reduce"


def _provider_case(bitwise: bool) -> tuple[bool, int]:
    """sp_reduce sharded vs replicated through the provider: (equal on the owned rows,
    provider calls)."""
    rank, _ = rank_and_size()
    before = flashcomm.bitwise_modes()
    flashcomm.set_all_reduce_provider(None, _define_reversed_provider(), "test")
    try:
        flashcomm.init(bitwise_modes=bitwise)
        p = _randn((17, H), torch.float32, 9000 + 7 * rank)
        calls = _PROVIDER_CALLS[0]
        sharded = flashcomm.sp_reduce(p, None, SP_THRESHOLD, True)
        replicated = flashcomm.sp_reduce(p, None, SP_THRESHOLD, False)
        lo, hi = _owned(17)
        return torch.equal(sharded[lo:hi], replicated[lo:hi]), _PROVIDER_CALLS[0] - calls
    finally:
        flashcomm.clear_all_reduce_provider(None)
        flashcomm.init(bitwise_modes=before)


def test_all_reduce_provider_is_bypassed(rank_pools):
    """With the setting on, the replicated reduction does not go through an all-reduce
    provider (its own sum order): it takes the sharded path's reduce-scatter instead."""
    pool = rank_pools(3, env={"FLASHCOMM_TRANSPORT": "shm"})
    assert pool.run(_provider_case, True) == [(True, 0)] * 3
    assert [calls for _, calls in pool.run(_provider_case, False)] == [1] * 3


def _agreement_error() -> str:
    rank, _ = rank_and_size()
    before = flashcomm.bitwise_modes()
    try:
        flashcomm.init(bitwise_modes=rank == 0)
    except RuntimeError as e:
        return str(e)
    finally:
        flashcomm.set_bitwise_modes(before)
        flashcomm.init()
    return "<no error>"


def test_ranks_agree_on_the_setting(rank_pools):
    msgs = rank_pools(2, env={"FLASHCOMM_TRANSPORT": "c10d"}).run(_agreement_error)
    for msg in msgs:
        assert "'bitwise modes FLASHCOMM_BITWISE_MODES': rank 0 = 1, rank 1 = 0" in msg, msg


def _model_logits_equal() -> list[str]:
    """The reference decoder (H 256, 2 layers), mode "flashcomm" with sp_threshold=100
    at n = 301 (every boundary op sharded) against mode "tp" (every op replicated),
    same weights: logits bitwise equal in fp32, bf16, W8A8 fp32 and W8A8 bf16."""
    from flashcomm.tools.models import ModelConfig, build_model
    before = flashcomm.bitwise_modes()
    flashcomm.init(bitwise_modes=True)
    failures = []
    try:
        cfg = ModelConfig()
        ids = torch.randint(0, cfg.vocab_size, (301,), generator=_gen(301))
        for dtype, w8a8 in ((torch.float32, False), (torch.bfloat16, False),
                            (torch.float32, True), (torch.bfloat16, True)):
            kwargs = dict(w8a8=w8a8, dtype=dtype, sp_threshold=100)
            with torch.no_grad():
                flashcomm.reset_stats()
                sharded = build_model(cfg, "flashcomm", **kwargs)(ids)
                op = "sp_row_linear_w8a8" if w8a8 else "sp_row_linear"
                assert flashcomm.stats()[op]["sharded"] > 0
                replicated = build_model(cfg, "tp", **kwargs)(ids)
            if not torch.equal(sharded, replicated):
                diff = (sharded - replicated).abs().max().item()
                failures.append(f"{dtype} w8a8={w8a8}: max |dlogit| {diff:.3g}")
    finally:
        flashcomm.init(bitwise_modes=before)
    return failures


@pytest.mark.parametrize("tp", [2, 4])
def test_reference_model_bitwise_equal_in_both_modes(ranks, tp):
    failures = ranks(tp).run(_model_logits_equal, timeout_s=600)
    assert failures == [[] for _ in range(tp)], failures
