"""flashcomm: token-count-adaptive tensor-parallel communication for LLM inference.

Custom ops (``torch.ops.flashcomm.*``) that fuse the reduce-scatter into the GEMM
before it and the all-gather into the GEMM after it, choosing per call between a
sequential and a pipelined (overlapped) strategy, with exact meta kernels so
``torch.compile`` traces one graph for every token count.
"""

from .ops import (
    DEFAULT_THRESHOLD,
    ag_gemm,
    ag_gemm_w8a8,
    all_reduce_provider,
    bitwise_modes,
    clear_all_reduce_provider,
    cpu_features,
    gemm_rs,
    gemm_rs_w8a8,
    get_pipeline_config,
    group_name,
    init,
    library_version,
    reset_stats,
    set_all_reduce_provider,
    set_bitwise_modes,
    set_pipeline_config,
    stats,
    transport,
)
from .sp import (
    DEFAULT_SP_THRESHOLD,
    owned_rows,
    sp_add_rms_norm,
    sp_add_rms_norm_,
    sp_column_linear,
    sp_column_linear_w8a8,
    sp_gather,
    sp_gather_,
    sp_mode,
    sp_reduce,
    sp_reduce_,
    sp_row_linear,
    sp_row_linear_w8a8,
)

from .weights import prepare_linear
from . import settings

settings.warn_unknown_env()  # a misspelt FLASHCOMM_* variable: once per process

__version__: str = library_version()

__all__ = [
    "__version__",
    "DEFAULT_SP_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "ag_gemm",
    "ag_gemm_w8a8",
    "all_reduce_provider",
    "bitwise_modes",
    "clear_all_reduce_provider",
    "cpu_features",
    "set_all_reduce_provider",
    "gemm_rs",
    "gemm_rs_w8a8",
    "get_pipeline_config",
    "owned_rows",
    "prepare_linear",
    "group_name",
    "init",
    "library_version",
    "reset_stats",
    "set_bitwise_modes",
    "set_pipeline_config",
    "sp_add_rms_norm",
    "sp_add_rms_norm_",
    "sp_column_linear",
    "sp_column_linear_w8a8",
    "sp_mode",
    "sp_row_linear",
    "sp_row_linear_w8a8",
    "sp_gather",
    "sp_gather_",
    "sp_reduce",
    "sp_reduce_",
    "stats",
    "transport",
]
