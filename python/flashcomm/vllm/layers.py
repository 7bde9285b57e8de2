"""flashcomm-backed replacements of vLLM's parallel linear layers and boundary RMSNorm.

The classes subclass vLLM's own (``RowParallelLinear``, ``ColumnParallelLinear``,
``MergedColumnParallelLinear``, ``QKVParallelLinear``, ``RMSNorm``) and are registered
out-of-tree under the original class names, so vLLM instantiates them while it builds
the model. Until :func:`convert_model` activates them they behave exactly like the
originals (per-head ``q_norm`` / ``k_norm`` and any layer outside the decoder pattern
stay that way).

:func:`convert_model` runs after the model is built and **before weights load** (hook
on ``BaseModelLoader.create_model``, see :mod:`flashcomm.vllm.plugin`). It validates
the whole configuration and model first and refuses (``FlashcommUnsupportedError``)
rather than converting half-way. It then, per decoder layer:

* ``input_layernorm`` / ``post_attention_layernorm`` -> ``sp_add_rms_norm``;
  the final ``model.norm`` -> ``sp_add_rms_norm(gather=True)``;
* ``qkv_proj`` / ``gate_up_proj`` -> ``sp_column_linear[_w8a8]``;
* ``o_proj`` / ``down_proj`` -> ``sp_row_linear[_w8a8]``,

and wraps each converted layer's quant method so that ``process_weights_after_loading``
keeps the weights in flashcomm's layout (``[N, K]`` FP, or int8 ``[N, K]`` with fp32
per-channel scales) instead of vLLM's CPU repack (which drops ``layer.weight``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

import flashcomm  # noqa: F401  (loads the op library)
from flashcomm import settings

from . import _compat
from ._compat import DISABLE_HINT, FlashcommUnsupportedError, refuse  # noqa: F401

# vLLM's classes (missing ones refuse here, when the plugin installs the layers).
RMSNorm = _compat.symbol("RMSNorm")
ColumnParallelLinear = _compat.symbol("ColumnParallelLinear")
MergedColumnParallelLinear = _compat.symbol("MergedColumnParallelLinear")
QKVParallelLinear = _compat.symbol("QKVParallelLinear")
RowParallelLinear = _compat.symbol("RowParallelLinear")
UnquantizedLinearMethod = _compat.symbol("UnquantizedLinearMethod")

logger = logging.getLogger("flashcomm.vllm")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")

# hf_config keys that mark a mixture-of-experts model.
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                   "num_experts_per_tok", "moe_intermediate_size")


@dataclass(frozen=True)
class FcState:
    """What an activated layer needs at run time (plain Python: constant under dynamo)."""

    group_name: str
    sp_threshold: int
    threshold: int = -1  # compact kernels' strategy threshold (< 0: auto)
    w8a8: bool = False
    gather: bool = False  # norms: make every row valid (final norm; every norm in engine form)
    engine_gemm: bool = False  # linears: vLLM's kernel computes, flashcomm communicates
    # vLLM's own forward (sp_threshold=auto found no batch worth sharding and vLLM's own
    # replicated path is at least as fast: calibration.stand_aside). Constant under
    # dynamo like the rest, so the traced graph is vLLM's own.
    stand_aside: bool = False


# ---------------------------------------------------------------------------------------
# Weight capture (runs instead of vLLM's process_weights_after_loading)
# ---------------------------------------------------------------------------------------

def _w8a8_scheme(layer: nn.Module) -> Any:
    return getattr(layer, "scheme", None)


def classify_quant_method(layer: nn.Module) -> Optional[str]:
    """``"fp"``, ``"w8a8"`` or None (unsupported) for a linear layer's quant method."""
    qm = getattr(layer, "quant_method", None)
    if isinstance(qm, UnquantizedLinearMethod):
        return "fp"
    scheme = _w8a8_scheme(layer)
    if isinstance(qm, _compat.symbol("CompressedTensorsLinearMethod")) and \
            isinstance(scheme, _compat.symbol("CompressedTensorsW8A8Int8")):
        if not scheme.is_static_input_scheme and not scheme.input_symmetric:
            return None  # dynamic asymmetric: flashcomm quantises dynamic symmetric only
        return "w8a8"
    return None


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.data.detach()


def _keep(layer: nn.Module, name: str, value: Optional[torch.Tensor]) -> None:
    """Register ``value`` as the non-persistent buffer ``name`` that the layer's forward
    reads, derived anew on every load.

    On a reload (vLLM's layerwise reload, e.g. RLHF weight updates) vLLM puts the
    layer's tensors back on the meta device, loads the new checkpoint tensors, runs
    ``process_weights_after_loading`` (this capture) and then re-registers the tensor
    *objects* the layer had before (CUDA graphs hold their addresses), copying new
    values only into parameters and persistent or loaded buffers: a derived buffer
    registered anew would be dropped and the old one, with the old scales, restored.
    So the first capture keeps its tensors (``layer._fc_kept``) and later ones write
    the values they derive into those same tensors."""
    kept = layer.__dict__.setdefault("_fc_kept", {})
    old = kept.get(name)
    if value is not None and old is not None:
        if old.shape != value.shape or old.dtype != value.dtype:
            raise RuntimeError(
                f"flashcomm: {getattr(layer, 'prefix', type(layer).__name__)}: reloaded "
                f"{name} is {value.dtype} {tuple(value.shape)}, was {old.dtype} "
                f"{tuple(old.shape)}; a reload must keep the shapes")
        if old.data_ptr() != value.data_ptr():
            old.copy_(value)
        value = old
    kept[name] = value
    layer.register_buffer(name, value, persistent=False)


def capture_fp(layer: nn.Module) -> None:
    """Keep ``layer.weight`` ``[N, K]`` as the buffer ``fc_weight`` (shared storage on
    the first load; a reload writes into it, :func:`_keep`)."""
    _keep(layer, "fc_weight", _plain(layer.weight))


def capture_w8a8(layer: nn.Module) -> None:
    """Take the int8 weight and scales of a CompressedTensorsW8A8Int8 layer before vLLM's
    kernel repacks them, mirroring the kernel's own scale conversions:
    per-tensor weight scales of fused layers -> per-channel; static input scales of
    fused layers -> their max (symmetric) or a merged range (asymmetric). Runs on every
    load, vLLM's reload included (:func:`_keep`)."""
    scheme = _w8a8_scheme(layer)
    weight = _plain(layer.weight)
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise refuse(f"{layer.prefix}: expected an int8 [N, K] weight, got {weight.dtype} "
                     f"{tuple(weight.shape)}")
    w_scale = _plain(layer.weight_scale).to(torch.float32)
    logical_widths = list(getattr(layer, "logical_widths", [weight.shape[0]]))
    if w_scale.numel() != weight.shape[0]:
        if w_scale.numel() == 1:
            w_scale = w_scale.reshape(1)
        else:  # per-tensor scale per fused shard -> per channel
            w_scale = torch.cat([w_scale.reshape(-1)[i].expand(w)
                                 for i, w in enumerate(logical_widths)]).contiguous()
    else:
        w_scale = w_scale.reshape(-1).contiguous()
    in_scale = in_zp = None
    if scheme.is_static_input_scheme:
        s = _plain(layer.input_scale).to(torch.float32).reshape(-1)
        if scheme.input_symmetric:
            in_scale = s.max().reshape(1)
        else:
            zp = _plain(layer.input_zero_point).to(torch.int32).reshape(-1)
            i8 = torch.iinfo(torch.int8)
            range_max = (s * (i8.max - zp)).max()
            range_min = (s * (i8.min - zp)).min()
            in_scale = ((range_max - range_min) / (i8.max - i8.min)).reshape(1)
            in_zp = (i8.min - range_min / in_scale).round().to(torch.int32).reshape(1)
    # Derived on every load (a reload included) into the tensors the forward reads.
    _keep(layer, "fc_weight", weight)
    _keep(layer, "fc_weight_scale", w_scale)
    _keep(layer, "fc_input_scale", in_scale)
    _keep(layer, "fc_input_zero_point", in_zp)


def wrap_process_weights(layer: nn.Module, kind: str) -> None:
    """Replace (on this quant-method instance only) vLLM's process_weights_after_loading
    by flashcomm's capture: the weights stay in flashcomm's layout and vLLM's CPU repack,
    which empties ``layer.weight``, never runs."""
    qm = layer.quant_method
    capture = capture_fp if kind == "fp" else capture_w8a8
    original = qm.process_weights_after_loading

    def process_weights_after_loading(target: nn.Module) -> None:
        if getattr(target, "_fc_state", None) is not None:
            capture(target)
        else:
            original(target)

    qm.process_weights_after_loading = process_weights_after_loading


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

def _bias_for(layer: nn.Module) -> Optional[torch.Tensor]:
    return None if layer.skip_bias_add else layer.bias


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` -> ``[n, K]``; a 2-D input as it is. (A reshaped view measured 20-30 µs
    slower in vLLM's W8A8 CPU kernel than the tensor itself, in eager mode.)"""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _unrows(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[n, N]`` back to ``x``'s leading dimensions."""
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def _ret(layer: nn.Module, out: torch.Tensor):
    if not layer.return_bias:
        return out
    return out, (layer.bias if layer.skip_bias_add else None)


class _FlashcommColumnMixin:
    """Column-parallel forward through ``sp_column_linear[_w8a8]``."""

    _fc_state: Optional[FcState] = None

    def forward(self, input_):
        st = self._fc_state
        if st is None:
            return super().forward(input_)
        x = _rows(input_)
        bias = _bias_for(self)
        gather = bool(self.gather_output and self.tp_size > 1)
        if st.w8a8:
            out = torch.ops.flashcomm.sp_column_linear_w8a8(
                x, self.fc_weight, self.fc_weight_scale, self.fc_input_scale,
                self.fc_input_zero_point, bias, st.group_name, x.dtype, st.sp_threshold, True,
                st.threshold, gather)
        else:
            out = torch.ops.flashcomm.sp_column_linear(
                x, self.fc_weight, bias, st.group_name, st.sp_threshold, True, st.threshold,
                gather)
        return _ret(self, _unrows(out, input_))


class FlashcommColumnParallelLinear(_FlashcommColumnMixin, ColumnParallelLinear):
    pass


class FlashcommMergedColumnParallelLinear(_FlashcommColumnMixin, MergedColumnParallelLinear):
    pass


class FlashcommQKVParallelLinear(_FlashcommColumnMixin, QKVParallelLinear):
    pass


class FlashcommRowParallelLinear(RowParallelLinear):
    """Row-parallel forward through ``sp_row_linear[_w8a8]`` (all-reduce when
    replicated, GEMM + reduce-scatter into the owned rows when sharded). Converted only
    where ``reduce_results`` is True."""

    _fc_state: Optional[FcState] = None

    def forward(self, input_):
        st = self._fc_state
        if st is None or st.stand_aside:
            return super().forward(input_)
        if self.input_is_parallel:
            x = input_
        else:
            x = input_.chunk(self.tp_size, dim=-1)[self.tp_rank].contiguous()
        rows = _rows(x)
        # vLLM's convention: bias on rank 0 only; the op adds it once per row.
        bias = None if (self.tp_rank > 0 or self.skip_bias_add) else self.bias
        if st.engine_gemm:
            # vLLM's own (packed) kernel computes the partial product; flashcomm replaces
            # only the all-reduce.
            # The partial is a fresh GEMM output nothing else reads: reduce it in place
            # (no allocation; Inductor keeps the mutation in place).
            out = self.quant_method.apply(self, rows, bias)
            torch.ops.flashcomm.sp_reduce_(out, st.group_name, st.sp_threshold, True)
        elif st.w8a8:
            out = torch.ops.flashcomm.sp_row_linear_w8a8(
                rows, self.fc_weight, self.fc_weight_scale, self.fc_input_scale,
                self.fc_input_zero_point, bias, st.group_name, rows.dtype, st.sp_threshold,
                True, st.threshold)
        else:
            out = torch.ops.flashcomm.sp_row_linear(rows, self.fc_weight, bias, st.group_name,
                                                    st.sp_threshold, True, st.threshold)
        return _ret(self, _unrows(out, x))


class FlashcommRMSNorm(RMSNorm):
    """vLLM's RMSNorm; once marked as a boundary norm, ``sp_add_rms_norm`` (same
    numerics as vLLM's native fused add + RMSNorm, on the owned rows when sharded)."""

    _fc_state: Optional[FcState] = None

    def forward(self, x, residual=None):
        st = self._fc_state
        if st is None or st.stand_aside:
            return super().forward(x, residual)
        if residual is None:  # the first norm: the caller keeps x as the residual
            normed, _ = torch.ops.flashcomm.sp_add_rms_norm(
                x, None, self.weight.data, self.variance_epsilon, st.group_name,
                st.sp_threshold, True, st.gather)
            return normed
        # As vLLM's own fused add + RMSNorm: in place (normed -> x, the new residual ->
        # residual), both dead to the caller afterwards.
        x, residual = x.contiguous(), residual.contiguous()
        torch.ops.flashcomm.sp_add_rms_norm_(x, residual, self.weight.data, self.variance_epsilon,
                                             st.group_name, st.sp_threshold, True, st.gather)
        return x, residual


LINEAR_SWAPS = {
    "RowParallelLinear": FlashcommRowParallelLinear,
    "ColumnParallelLinear": FlashcommColumnParallelLinear,
    "MergedColumnParallelLinear": FlashcommMergedColumnParallelLinear,
    "QKVParallelLinear": FlashcommQKVParallelLinear,
}
FLASHCOMM_LINEAR_TYPES = tuple(LINEAR_SWAPS.values())

_INSTALLED = False


def install() -> None:
    """Register the replacement classes with vLLM (idempotent, per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    CustomOp, PluggableLayer = _compat.symbol("CustomOp"), _compat.symbol("PluggableLayer")
    op_registry_oot = _compat.symbol("op_registry_oot")
    for name, cls in LINEAR_SWAPS.items():
        if op_registry_oot.get(name) is not cls:
            PluggableLayer.register_oot(cls, name=name)
    if op_registry_oot.get("RMSNorm") is not FlashcommRMSNorm:
        CustomOp.register_oot(FlashcommRMSNorm, name="RMSNorm")
    # register_oot renames the class for the enable/disable lookup; keep vLLM's own
    # op name so `custom_ops=["+rms_norm"]` still means the same.
    FlashcommRMSNorm.name = RMSNorm.name
    _INSTALLED = True


# ---------------------------------------------------------------------------------------
# Validation and conversion
# ---------------------------------------------------------------------------------------

# Why VLLM_BATCH_INVARIANT=1 is refused rather than honoured. Under that flag vLLM
# promises that a request's output does not depend on the batch it runs in: it computes
# linears with its batch-invariant GEMM and turns its own order-varying collectives into
# fixed-order ones. flashcomm cannot keep that promise today: (1) in the `flashcomm` GEMM
# form its fused ops replace vLLM's batch-invariant linear; (2) in every form the
# reduction switches between all-reduce (replicated) and reduce-scatter + all-gather
# (sharded) at sp_threshold, i.e. with the batch's token count, and its boundary norms
# replace vLLM's batch-invariant RMSNorm; (3) the bitwise equality of the two modes
# (README, "Numerics across the threshold") holds by default only for the engine form on
# shm (any tp) or c10d at tp = 2, everywhere else only with FLASHCOMM_BITWISE_MODES=1,
# NCCL's sum order is not documented, and none of it has run under vLLM's
# batch-invariant mode (whose kernels do not run on CPU, where the integration is
# tested). Honouring the flag would need that guarantee on the transport in use and an
# engine test of it under the flag.
BATCH_INVARIANT_REASON = (
    "VLLM_BATCH_INVARIANT=1 is set, and flashcomm cannot keep vLLM's batch-invariance "
    "guarantee: it switches the TP collective (all-reduce below sp_threshold tokens, "
    "reduce-scatter + all-gather above) with the batch's token count, replaces vLLM's "
    "batch-invariant RMSNorm (and, in the flashcomm GEMM form, its batch-invariant "
    "linear), and whether its replicated and sharded results are bitwise equal "
    "depends on the transport, tp and FLASHCOMM_BITWISE_MODES, untested under vLLM's "
    "batch-invariant kernels. Unset VLLM_BATCH_INVARIANT to use flashcomm")


def check_config(vllm_config: Any) -> None:
    """Refuse configurations flashcomm cannot run correctly (raises): unsupported
    architectures, MoE, the parallelism and features of
    :data:`~flashcomm.vllm._compat.REFUSED_PARALLELISM` /
    :data:`~flashcomm.vllm._compat.REFUSED_FEATURES`, vLLM's collective-rewriting
    passes (the refusal names the flag that turns the pass off) and
    ``VLLM_BATCH_INVARIANT=1`` (:data:`BATCH_INVARIANT_REASON`)."""
    mc = _compat.attribute(vllm_config, "model_config")
    hf = getattr(mc, "hf_config", None)
    archs = list(getattr(hf, "architectures", None) or [])
    if not archs or any(a not in SUPPORTED_ARCHITECTURES for a in archs):
        raise refuse(f"architecture {archs} is not supported (supported dense decoders: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    texts = [hf] + [getattr(hf, "text_config", None)]
    for cfg in texts:
        for key in MOE_CONFIG_KEYS:
            if cfg is not None and getattr(cfg, key, None):
                raise refuse(f"mixture-of-experts models are not supported (config has "
                             f"{key}={getattr(cfg, key)})")
    pc = _compat.attribute(vllm_config, "parallel_config")
    for field, what in _compat.REFUSED_PARALLELISM.items():
        size = _compat.attribute(pc, field)
        if size > 1:
            raise refuse(f"{what} is not supported ({field}={size})")
    for field, what in _compat.REFUSED_FEATURES.items():
        if _compat.attribute(vllm_config, field) is not None:
            raise refuse(f"{what} is not supported")
    passes = _compat.attribute(_compat.attribute(vllm_config, "compilation_config"),
                               "pass_config")
    for name in _compat.collective_passes_on(passes):
        # vLLM 0.32 turns fuse_allreduce_rms on by default on H100 / B200 with
        # FlashInfer (optimization level 2), so the refusal says how to turn it off.
        raise refuse(f"vLLM's compilation pass {name} is on; it rewrites the same "
                     f"collectives. Turn it off to use flashcomm: "
                     f"{_compat.pass_off_flag(name)}")
    if _compat.attribute(_compat.symbol("envs"), "VLLM_BATCH_INVARIANT"):
        raise refuse(BATCH_INVARIANT_REASON)


def _expected_layout(model: nn.Module) -> tuple[dict[str, tuple[str, bool]], list[nn.Module]]:
    """Expected converted modules: name -> (role, gather) ; and the decoder layers."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not isinstance(getattr(inner, "norm", None),
                                                         FlashcommRMSNorm):
        raise refuse(f"{type(model).__name__} does not have the model.layers / model.norm "
                     f"structure of a supported dense decoder")
    expect: dict[str, tuple[str, bool]] = {"model.norm": ("norm", True)}
    for i, _ in enumerate(layers):
        p = f"model.layers.{i}."
        expect[p + "input_layernorm"] = ("norm", False)
        expect[p + "post_attention_layernorm"] = ("norm", False)
        expect[p + "self_attn.qkv_proj"] = ("column", False)
        expect[p + "self_attn.o_proj"] = ("row", False)
        expect[p + "mlp.gate_up_proj"] = ("column", False)
        expect[p + "mlp.down_proj"] = ("row", False)
    return expect, list(layers)


def check_model(model: nn.Module, tp_size: int) -> dict[str, tuple[nn.Module, str, bool, str]]:
    """Every expected module present with the right type and a supported quant method,
    and no parallel linear layer anywhere else. Returns name -> (module, role, gather,
    kind). Raises (refuses) otherwise."""
    expect, _ = _expected_layout(model)
    modules = dict(model.named_modules())
    plan: dict[str, tuple[nn.Module, str, bool, str]] = {}
    for name, (role, gather) in expect.items():
        mod = modules.get(name)
        want = {"norm": FlashcommRMSNorm, "column": _FlashcommColumnMixin,
                "row": FlashcommRowParallelLinear}[role]
        if not isinstance(mod, want):
            raise refuse(f"{name} is {type(mod).__name__}, expected vLLM's "
                         f"{want.__name__.replace('Flashcomm', '').lstrip('_')}")
        kind = "norm"
        if role == "norm":
            if not mod.has_weight or mod.variance_size_override is not None:
                raise refuse(f"{name}: RMSNorm without weight or with a variance size "
                             f"override is not supported")
        else:
            kind = classify_quant_method(mod)
            if kind is None:
                qm = mod.quant_method
                raise refuse(f"{name}: quantization {type(qm).__name__}"
                             f"({type(_w8a8_scheme(mod)).__name__}) is not supported (FP and "
                             f"compressed-tensors W8A8 int8 are)")
            if _compat.attribute(mod, "tp_size") != tp_size:
                raise refuse(f"{name} does not use the tensor-parallel group (disable_tp)")
            if role == "row" and not mod.reduce_results:
                raise refuse(f"{name} has reduce_results=False")
            if role == "column" and mod.gather_output:
                raise refuse(f"{name} has gather_output=True")
        plan[name] = (mod, role, gather, kind)
    for name, mod in modules.items():
        if isinstance(mod, FLASHCOMM_LINEAR_TYPES) and name not in plan:
            raise refuse(f"parallel linear layer {name} ({type(mod).__name__}) is outside the "
                         f"decoder pattern flashcomm knows (norm -> column -> ... -> row)")
    return plan


def cudagraph_max_size(vllm_config: Any) -> Optional[int]:
    """The largest batch (in tokens) vLLM captures in a CUDA graph, from the real
    ``vllm_config.compilation_config``; None when it captures none (``cudagraph_mode``
    NONE: on CPU, where vLLM empties the capture sizes, and with ``enforce_eager``)."""
    cc = _compat.attribute(vllm_config, "compilation_config")
    mode = _compat.attribute(cc, "cudagraph_mode")
    if mode is None or mode == _compat.symbol("CUDAGraphMode").NONE:
        return None
    sizes = [int(s) for s in (_compat.attribute(cc, "cudagraph_capture_sizes") or [])]
    # YOCO models' decoder-replay graphs (at most max_cudagraph_capture_size in 0.32).
    replay = getattr(cc, "decoder_replay_cudagraph_capture_sizes", None) or []
    sizes += [int(s) for s in replay]
    largest = getattr(cc, "max_cudagraph_capture_size", None)
    if largest:
        sizes.append(int(largest))
    return max(sizes) if sizes else None


def effective_sp_threshold(vllm_config: Any, sp_threshold: int) -> int:
    """``sp_threshold``, raised to the largest CUDA-graph capture size when vLLM captures
    bigger batches: every captured size then runs replicated, so the sharded path (c10d
    reduce-scatter and all-gather) is never captured inside vLLM's graphs next to its
    own communicators (that combination has not run). Batches above the largest
    capture size run outside CUDA graphs and may still run sharded. Logs a warning
    when it raises the threshold. Rank-invariant (the configuration only)."""
    largest = cudagraph_max_size(vllm_config)
    if largest is None or sp_threshold >= largest:
        return int(sp_threshold)
    _compat.logger.warning(
        "flashcomm: sp_threshold %d is below vLLM's largest CUDA-graph capture size %d; "
        "using sp_threshold=%d so that every captured batch runs replicated (the "
        "sharded path is not run inside CUDA graphs). Lower the capture sizes "
        "(-cc.max_cudagraph_capture_size) to shard smaller batches.", sp_threshold,
        largest, largest)
    return int(largest)


def record_conversion(vllm_config: Any, record: dict[str, Any]) -> None:
    """Store ``record`` (the settings baked into the converted layers, which the
    compiled graph depends on: the c10d group name, thresholds, GEMM form, transport,
    all-reduce provider, version) as
    ``vllm_config.additional_config["flashcomm"]["_conversion"]``, which vLLM hashes into
    its compile cache key (``VllmConfig.compute_hash``). The user's settings beside it
    stay as they are (the dict holding them is copied, not changed)."""
    extra = _compat.attribute(vllm_config, "additional_config")
    if not isinstance(extra, dict):
        raise refuse(f"vLLM's additional_config is a {type(extra).__name__}, not a dict: "
                     f"flashcomm records the settings its compiled layers depend on "
                     f"there, so that they enter vLLM's compile cache key")
    section = extra.get(settings.CONFIG_KEY)
    user = dict(section) if isinstance(section, dict) else {}
    extra[settings.CONFIG_KEY] = {**user, settings.RECORD_KEY: dict(record)}


GEMM_FORMS = ("auto", "engine", "flashcomm")


def resolve_gemm_form(requested: str, device_type: str, w8a8: bool) -> str:
    """``engine`` or ``flashcomm`` (see the module docstring) for ``requested`` in
    :data:`GEMM_FORMS`. ``auto``: ``engine`` on CPU (no idle core for a pipelined
    overlap; vLLM's packed kernels are the fastest GEMMs there) and for W8A8 (vLLM's
    fused int8 kernels), ``flashcomm`` for floating-point models on accelerators."""
    if requested not in GEMM_FORMS:
        raise ValueError(f"flashcomm: FLASHCOMM_VLLM_GEMM must be one of {GEMM_FORMS}, got "
                         f"{requested!r}")
    if requested != "auto":
        return requested
    return "engine" if device_type == "cpu" or w8a8 else "flashcomm"


def convert_model(model: nn.Module, vllm_config: Any, sp_threshold: int,
                  threshold: int = -1, vllm_all_reduce: Optional[bool] = None,
                  gemm: Optional[str] = None) -> int:
    """Validate and activate flashcomm on a freshly built (not yet loaded) vLLM model.
    All or nothing: raises :class:`FlashcommUnsupportedError` before touching anything.
    ``vllm_all_reduce``: replicated calls all-reduce through vLLM's communicator for the
    TP group instead of flashcomm's transport. ``gemm``: the form of the converted
    layers (:data:`GEMM_FORMS`; default ``FLASHCOMM_VLLM_GEMM``, else ``auto``).
    ``sp_threshold`` is raised to vLLM's largest CUDA-graph capture size where that is
    larger (:func:`effective_sp_threshold`). The settings the layers bake in, the
    c10d group name included, go into vLLM's compile cache key
    (:func:`record_conversion`).
    Collective over the TP group (every worker converts its copy of the model): the
    ranks verify their settings and choose the transport here, before the first
    forward. Returns the number of converted modules."""
    check_config(vllm_config)
    if not isinstance(_compat.attribute(vllm_config, "additional_config"), dict):
        record_conversion(vllm_config, {})  # refuses before anything is converted
    group = _compat.symbol("get_tp_group")()
    plan = check_model(model, group.world_size)
    requested_sp_threshold = int(sp_threshold)
    sp_threshold = effective_sp_threshold(vllm_config, requested_sp_threshold)
    w8a8 = any(kind == "w8a8" for _, _, _, kind in plan.values())
    form = resolve_gemm_form(gemm or str(settings.setting("gemm").from_env()),
                             str(_compat.symbol("current_platform").device_type), w8a8)
    engine = form == "engine"
    gname = group.device_group.group_name
    converted = 0
    for name, (mod, role, gather, kind) in plan.items():
        if engine and role == "column":
            continue  # vLLM's own layer, on every row (the norm before it gathered them)
        if role != "norm" and not engine:
            wrap_process_weights(mod, kind)
        mod._fc_state = FcState(group_name=gname, sp_threshold=int(sp_threshold),
                                threshold=int(threshold), w8a8=(kind == "w8a8"),
                                gather=gather or (engine and role == "norm"),
                                engine_gemm=engine and role == "row")
        converted += 1
    # Every worker converts its model at the same point: the ranks verify their settings
    # and choose the transport here, before the first forward.
    flashcomm.init(gname, sp_threshold=int(sp_threshold), threshold=int(threshold),
                   enabled=True)
    # Replicated (decode-sized) calls may all-reduce through vLLM's own communicator for
    # this group (custom all-reduce / pynccl on CUDA, shared memory on CPU) instead of
    # flashcomm's transport. Unset: flashcomm's when it is shared memory (on CPU: a
    # Python call into vllm::all_reduce costs ~20 us more per layer, and vLLM's AVX2
    # build all-reduces over gloo; BENCHMARKS.md), vLLM's otherwise. Every worker
    # decides the same.
    provider = ""
    if vllm_all_reduce is None:
        vllm_all_reduce = flashcomm.transport(gname) != "shm"
    if vllm_all_reduce and group.world_size > 1:
        flashcomm.set_all_reduce_provider(gname, "vllm::all_reduce", group.unique_name)
        provider = flashcomm.all_reduce_provider(gname)
        flashcomm.init(gname, sp_threshold=int(sp_threshold), threshold=int(threshold),
                       enabled=True)  # the ranks compare the provider too
    transport = flashcomm.transport(gname)
    # The compile cache key does not see FLASHCOMM_* env vars, nor the group name the
    # layers pass to the ops (a constant in the compiled graph): put them in the config.
    record_conversion(vllm_config, {
        "sp_threshold": int(sp_threshold), "sp_threshold_requested": requested_sp_threshold,
        "threshold": int(threshold), "version": flashcomm.__version__,
        "all_reduce": provider, "gemm": form, "transport": transport, "group": gname})
    logger.debug("flashcomm: converted %d modules of %s (tp=%d, sp_threshold=%d, GEMMs by %s, "
                "transport %s, replicated all-reduce via %s, group %s)", converted,
                type(model).__name__, group.world_size, sp_threshold,
                "vLLM's kernels" if engine else "flashcomm", transport, provider or transport,
                gname)
    return converted
