"""A reference tensor-parallel decoder (Qwen3 / Llama style) built from the
layout-invariant ops, with plain-TP and dense single-process baselines.

Layer: input RMSNorm -> QKV (column-parallel) -> per-head q/k RMSNorm -> RoPE ->
causal attention -> o_proj (row-parallel) -> post-attention RMSNorm -> gate_up
(column-parallel) -> SiLU-and-mul -> down_proj (row-parallel); then the final
norm and a vocab-parallel LM head. One sequence of n tokens per forward
(positions 0..n-1), as in a prefill.

Modes:
* ``"flashcomm"``: the layout-invariant ops (replicated below ``sp_threshold``,
  sequence-parallel with fused RS / AG above it);
* ``"tp"``: plain TP: the same ops with ``enabled=False`` (every call replicated:
  GEMM + all-reduce on the same kernels, packed weights and transport), so comparing
  it with ``"flashcomm"`` isolates sequence parallelism;
* ``"dense"``: the whole model in one process, no communication.

Weights are drawn from a seeded generator from the full (unsharded) shapes, so
every rank and every mode holds slices of the same model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flashcomm import sp
from flashcomm.ops import group_name as resolve_group_name
from flashcomm.tools.reference import quantize_dynamic, quantize_weight_per_channel
from flashcomm.weights import is_packed, prepare_linear

logger = logging.getLogger(__name__)

MODES = ("flashcomm", "tp", "dense")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the reference decoder. Head counts and sizes must divide by tp."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = True  # Qwen3's per-head q/k RMSNorm (not a boundary norm)
    seed: int = 0

    def check_tp(self, tp: int) -> None:
        for name in ("vocab_size", "intermediate_size", "num_heads", "num_kv_heads"):
            if getattr(self, name) % tp:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} is not divisible "
                                 f"by tp={tp}")


# The tests' model: every layer small enough for many multi-rank cases.
TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=4, head_dim=16)
# The demo's, the benchmarks' and the tuner's model (their --hidden / --layers scale it).
DEMO_MODEL = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2,
                         num_heads=8, num_kv_heads=4, head_dim=64)


def scaled_demo_model(hidden_size: int, num_layers: int) -> ModelConfig:
    """:data:`DEMO_MODEL` with ``hidden_size`` (intermediate = 2x hidden, head_dim =
    hidden / heads) and ``num_layers``: the model of the CLI's ``--hidden`` / ``--layers``."""
    return replace(DEMO_MODEL, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                   num_layers=num_layers, head_dim=max(1, hidden_size // DEMO_MODEL.num_heads))


def full_weights(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every weight of the unsharded model, from cfg.seed (identical on every rank)."""
    g = torch.Generator().manual_seed(cfg.seed)
    H, inter, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)

    def norm(size: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(size, generator=g)).to(dtype)

    w: dict[str, torch.Tensor] = {"embed": torch.randn(cfg.vocab_size, H, generator=g).to(dtype)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        w[p + "ln1"] = norm(H)
        w[p + "q"] = linear(cfg.num_heads * D, H)
        w[p + "k"] = linear(cfg.num_kv_heads * D, H)
        w[p + "v"] = linear(cfg.num_kv_heads * D, H)
        w[p + "q_norm"] = norm(D)
        w[p + "k_norm"] = norm(D)
        w[p + "o"] = linear(H, cfg.num_heads * D)
        w[p + "ln2"] = norm(H)
        w[p + "gate"] = linear(inter, H)
        w[p + "up"] = linear(inter, H)
        w[p + "down"] = linear(H, inter)
    w["final_norm"] = norm(H)
    w["lm_head"] = linear(cfg.vocab_size, H)
    return w


def _rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    step = t.shape[0] // tp
    return t[rank * step:(rank + 1) * step]


def _cols(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    step = t.shape[1] // tp
    return t[:, rank * step:(rank + 1) * step].contiguous()


class _Linear(nn.Module):
    """One rank's slice of a linear layer; FP or W8A8 (per-channel int8 weight)."""

    def __init__(self, weight: torch.Tensor, w8a8: bool) -> None:
        super().__init__()
        self.w8a8 = w8a8
        if w8a8:
            w_q, w_s = quantize_weight_per_channel(weight)
            self.register_buffer("weight", w_q)
            self.register_buffer("weight_scale", w_s)
        else:
            self.register_buffer("weight", weight.contiguous())
            self.weight_scale = None


class DecoderModel(nn.Module):
    """The reference decoder on this rank. ``forward(input_ids [n]) -> logits [n, vocab]``
    (float32), identical in shape on every rank and in every mode."""

    def __init__(self, cfg: ModelConfig, mode: str = "flashcomm", *, w8a8: bool = False,
                 dtype: torch.dtype = torch.float32, group: Optional[dist.ProcessGroup] = None,
                 sp_threshold: int = sp.DEFAULT_SP_THRESHOLD, threshold: int = -1) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.mode, self.w8a8, self.dtype = cfg, mode, w8a8, dtype
        self.sp_threshold, self.threshold = sp_threshold, threshold
        if mode == "dense":
            self.tp, self.rank, self.group_name = 1, 0, ""
        else:
            self.group_name = resolve_group_name(group)
            self.tp = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        cfg.check_tp(self.tp)
        tp, r = self.tp, self.rank
        w = full_weights(cfg, dtype)
        self.register_buffer("embed", w["embed"])
        self.register_buffer("final_norm", w["final_norm"])
        self.lm_head = _Linear(_rows(w["lm_head"], tp, r), False)
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            layer = nn.Module()
            for name in ("ln1", "ln2", "q_norm", "k_norm"):
                layer.register_buffer(name, w[p + name])
            # Column-parallel slices: this rank's heads / intermediate features.
            layer.qkv = _Linear(torch.cat([_rows(w[p + "q"], tp, r), _rows(w[p + "k"], tp, r),
                                           _rows(w[p + "v"], tp, r)]), w8a8)
            layer.gate_up = _Linear(torch.cat([_rows(w[p + "gate"], tp, r),
                                               _rows(w[p + "up"], tp, r)]), w8a8)
            # Row-parallel slices: this rank's input features.
            layer.o = _Linear(_cols(w[p + "o"], tp, r), w8a8)
            layer.down = _Linear(_cols(w[p + "down"], tp, r), w8a8)
            self.layers.append(layer)

    def prepare(self, pack: Optional[bool] = None) -> "DecoderModel":
        """Packs every linear weight once for flashcomm's GEMMs
        (:func:`flashcomm.weights.prepare_linear`; ``pack`` as there). Each packed
        weight replaces the plain one in its module, so the model never holds both.

        The ``"flashcomm"`` and ``"tp"`` modes run their linears through the flashcomm
        ops; the ``"dense"`` reference calls ``F.linear`` / ``torch._int_mm``, which need
        plain weights, and is left unchanged. Call before ``torch.compile``. Returns
        ``self``.
        """
        if self.mode == "dense":
            logger.info("DecoderModel.prepare: mode %r keeps plain weights", self.mode)
            return self
        packed = 0
        for module in self.modules():
            if isinstance(module, _Linear):
                module.weight = prepare_linear(module.weight, pack)
                packed += int(is_packed(module.weight))
        logger.info("DecoderModel.prepare: %d linear weights packed", packed)
        return self

    # --- boundary ops, per mode -------------------------------------------------

    # Both distributed modes run the same flashcomm ops (same GEMMs, packed weights,
    # norm kernel and transport): "tp" with enabled=False, so every call is replicated
    # (GEMM + all-reduce, exactly plain TP), "flashcomm" sharded above sp_threshold.
    # The comparison of the two therefore isolates sequence parallelism.

    @property
    def _sp_enabled(self) -> bool:
        return self.mode == "flashcomm"

    def _norm(self, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
              gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "dense":
            return add_rms_norm(x, residual, weight, self.cfg.rms_eps)
        return sp.sp_add_rms_norm(x, residual, weight, self.cfg.rms_eps, self.group_name,
                                  self.sp_threshold, self._sp_enabled, gather)

    def _column(self, x: torch.Tensor, lin: _Linear) -> torch.Tensor:
        if self.mode == "dense":
            return _local_linear(x, lin, self.dtype)
        if lin.w8a8:
            return sp.sp_column_linear_w8a8(x, lin.weight, lin.weight_scale, None, None, None,
                                            self.group_name, self.dtype, self.sp_threshold,
                                            self._sp_enabled, self.threshold)
        return sp.sp_column_linear(x, lin.weight, None, self.group_name, self.sp_threshold,
                                   self._sp_enabled, self.threshold)

    def _row(self, x: torch.Tensor, lin: _Linear) -> torch.Tensor:
        if self.mode == "dense":
            return _local_linear(x, lin, self.dtype)
        if lin.w8a8:
            return sp.sp_row_linear_w8a8(x, lin.weight, lin.weight_scale, None, None, None,
                                         self.group_name, self.dtype, self.sp_threshold,
                                         self._sp_enabled, self.threshold)
        return sp.sp_row_linear(x, lin.weight, None, self.group_name, self.sp_threshold,
                                self._sp_enabled, self.threshold)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        # Vocab-parallel: local GEMM, then all ranks' vocab slices side by side. x is
        # valid on every row here (the final norm gathered it), so the op runs
        # replicated (enabled=False): GEMM + feature all-gather.
        if self.mode == "dense":
            return F.linear(x, self.lm_head.weight).float()
        return sp.sp_column_linear(x, self.lm_head.weight, None, self.group_name,
                                   self.sp_threshold, False, -1, True).float()

    # --- the model ----------------------------------------------------------------

    def _attention(self, layer: nn.Module, qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        cfg, D = self.cfg, self.cfg.head_dim
        hq, hkv = cfg.num_heads // self.tp, cfg.num_kv_heads // self.tp
        n = qkv.shape[0]
        q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
        q, k, v = q.view(n, hq, D), k.view(n, hkv, D), v.view(n, hkv, D)
        if cfg.qk_norm:  # per-head norms over head_dim: local, never a boundary op
            q, _ = add_rms_norm(q, None, layer.q_norm, cfg.rms_eps)
            k, _ = add_rms_norm(k, None, layer.k_norm, cfg.rms_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Causal attention with explicit batched GEMMs over heads (bmm keeps the
        # token dim symbolic without size-1 special cases under torch.compile).
        if hkv != hq:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        # [heads, n, D], materialised: bmm on permuted views of an unbacked n
        # makes inductor guard on n == 1.
        qh, kh, vh = (t.transpose(0, 1).contiguous() for t in (q, k, v))
        scores = torch.bmm(qh, kh.transpose(1, 2).contiguous()).float() * D**-0.5
        causal = torch.ones(n, n, dtype=torch.bool, device=qkv.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1).to(qkv.dtype)
        out = torch.bmm(probs, vh)
        return out.transpose(0, 1).contiguous().view(n, hq * D)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n = input_ids.shape[0]
        cos, sin = rope_tables(n, cfg.head_dim, cfg.rope_theta, self.dtype, input_ids.device)
        h = self.embed[input_ids]
        residual: Optional[torch.Tensor] = None
        for layer in self.layers:
            x, residual = self._norm(h, residual, layer.ln1)
            attn = self._attention(layer, self._column(x, layer.qkv), cos, sin)
            h = self._row(attn, layer.o)
            x, residual = self._norm(h, residual, layer.ln2)
            gate, up = self._column(x, layer.gate_up).chunk(2, dim=-1)
            h = self._row(F.silu(gate) * up, layer.down)
        x, _ = self._norm(h, residual, self.final_norm, gather=True)
        return self._lm_head(x)


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's add + RMSNorm in plain torch: ``s = x + residual`` in fp32; returns
    ``(rmsnorm(s) * weight, s)`` in x's dtype."""
    s = x.float() if residual is None else x.float() + residual.float()
    normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return normed, s.to(x.dtype)


def rope_tables(n: int, head_dim: int, theta: float, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[n, 1, head_dim]`` for positions 0..n-1 (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(n, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [n, heads, head_dim]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _local_linear(x: torch.Tensor, lin: _Linear, dtype: torch.dtype) -> torch.Tensor:
    """This rank's GEMM in plain torch (the baselines). W8A8: dynamic per-token
    activation quantisation, exact integer GEMM, per-channel dequantisation."""
    if not lin.w8a8:
        return F.linear(x, lin.weight)
    q, s = quantize_dynamic(x)
    acc = torch._int_mm(q, lin.weight.t())
    return (acc.float() * s * lin.weight_scale[None, :]).to(dtype)


def build_model(cfg: ModelConfig, mode: str, prepare: bool = True, **kwargs) -> DecoderModel:
    """``DecoderModel(cfg, mode, **kwargs)`` in eval mode, its weights prepared
    (:meth:`DecoderModel.prepare`, packing where it pays) unless ``prepare=False``."""
    model = DecoderModel(cfg, mode, **kwargs).eval()
    return model.prepare() if prepare else model


__all__ = ["DEMO_MODEL", "MODES", "TINY", "DecoderModel", "ModelConfig", "add_rms_norm",
           "apply_rope", "build_model", "full_weights", "rope_tables", "scaled_demo_model"]
