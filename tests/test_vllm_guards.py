"""What the vLLM integration cannot see, refused or honoured (issue 23, items 6-10), against
the installed vLLM's own objects (no engine is started):

* ``VLLM_BATCH_INVARIANT=1``: refused, with the reason (``layers.BATCH_INVARIANT_REASON``).
* CUDA graphs: the effective ``sp_threshold`` is raised to the largest capture size of
  a real ``CompilationConfig`` (every captured batch runs replicated) and logged, and
  the layers ``convert_model`` activates get it (rank pool, tp = 2); on CPU, where vLLM
  captures nothing, it is unchanged. A collective-rewriting pass
  (``fuse_allreduce_rms``, on by default on H100 / B200 with FlashInfer) is refused with
  the flag that turns it off, which vLLM's own command-line parser and config accept.
* Reload: vLLM's layerwise ``reload_weights`` of a converted model (``flashcomm`` GEMM
  form, W8A8 static and FP) leaves every derived buffer (``fc_weight_scale``,
  ``fc_input_scale``, ...) and every layer's output equal to a fresh load of the new
  checkpoint (rank pool, tp = 2, vLLM's TP group over gloo).
* The c10d group name the converted layers bake into the compiled graph is part of
  ``additional_config["flashcomm"]["_conversion"]``, so it changes vLLM's compile cache
  key (``VllmConfig.compute_hash``); the user's settings beside it stay as given.
* A model loader that builds its model without ``BaseModelLoader.create_model``
  (TensorizerLoader, the weight-cache IpcModelLoader, an out-of-tree loader) is
  reported with a warning that names it (subprocess: the plugin patches vLLM's loader
  classes process-wide).

Skipped (with the reason) when vLLM is not importable.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _vllm_cases import REFUSAL, flashcomm_log, requires_vllm
from flashcomm.tools.testing import RankPools
from flashcomm.tools.vllm_engine import make_checkpoint

pytestmark = requires_vllm

ROOT = Path(__file__).resolve().parents[1]


# vLLM's default capture sizes ([1, 2, 4] + range(8, 256, 8) + range(256, max + 1, 16))
# for a given max_cudagraph_capture_size.
def _capture_sizes(largest: int) -> list[int]:
    return [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, largest + 1, 16))


# (cudagraph_mode, capture sizes, requested sp_threshold, effective sp_threshold)
CUDAGRAPH_CASES = [
    ("FULL_AND_PIECEWISE", _capture_sizes(1024), 1000, 1024),  # max_num_seqs=1024
    ("FULL_AND_PIECEWISE", _capture_sizes(512), 1000, 1000),   # the default cap: kept
    ("PIECEWISE", _capture_sizes(512), 64, 512),               # a user's low threshold
    ("FULL_DECODE_ONLY", _capture_sizes(256), 100, 256),
    ("FULL", [1, 2, 4, 8], 8, 8),                              # equal: kept
    ("NONE", _capture_sizes(1024), 64, 64),                    # no CUDA graphs
]

# Checkpoints whose weights are reloaded: (id, make_tiny_checkpoint.py arguments of the
# first and of the second checkpoint). The second has other weights and, for W8A8
# static, other input scales (the derived fc_input_scale must follow).
RELOAD_CASES = [
    ("w8a8-static", ["--w8a8", "--act", "static", "--input-absmax", "6.0", "--seed", "0"],
     ["--w8a8", "--act", "static", "--input-absmax", "3.0", "--seed", "1"]),
    ("fp", ["--seed", "0"], ["--seed", "1"]),
]
RELOAD_TP = 2
DERIVED = ("fc_weight", "fc_weight_scale", "fc_input_scale", "fc_input_zero_point")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("guards"), "llama", "--arch", "llama")


def _vllm_config(model: Path, **kwargs):
    from vllm.config import ModelConfig, VllmConfig
    mc = ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="float32")
    return VllmConfig(model_config=mc, **kwargs)


@pytest.fixture
def fc_log():
    """WARNING+ records of the vllm.flashcomm logger."""
    with flashcomm_log() as records:
        yield records


# ---------------------------------------------------------------------------------------
# Item 6: VLLM_BATCH_INVARIANT
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,refused", [("1", True), ("0", False)])
def test_batch_invariant_is_refused(llama, monkeypatch, value, refused):
    from flashcomm.vllm.layers import FlashcommUnsupportedError, check_config

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", value)
    cfg = _vllm_config(llama)
    if not refused:
        check_config(cfg)
        return
    with pytest.raises(FlashcommUnsupportedError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert REFUSAL in msg and "VLLM_BATCH_INVARIANT=1" in msg, msg
    assert "Unset VLLM_BATCH_INVARIANT" in msg and "unset FLASHCOMM_ENABLE" in msg, msg


# ---------------------------------------------------------------------------------------
# Item 7: CUDA-graph capture sizes and the fusion pass's flag
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,sizes,requested,effective", CUDAGRAPH_CASES,
                         ids=[f"{c[0]}-{max(c[1])}-{c[2]}" for c in CUDAGRAPH_CASES])
def test_threshold_covers_cudagraph_capture_sizes(llama, fc_log, mode, sizes, requested,
                                                  effective):
    from vllm.config import CompilationConfig

    from flashcomm.vllm.layers import cudagraph_max_size, effective_sp_threshold

    cfg = _vllm_config(llama)
    # The compilation config vLLM leaves on a GPU (on CPU it clears the capture sizes).
    cfg.compilation_config = CompilationConfig(cudagraph_mode=mode,
                                               cudagraph_capture_sizes=sizes)
    largest = None if mode == "NONE" else max(sizes)
    assert cudagraph_max_size(cfg) == largest
    assert effective_sp_threshold(cfg, requested) == effective
    raised = [r.getMessage() for r in fc_log if "CUDA-graph capture size" in r.getMessage()]
    if effective != requested:
        assert len(raised) == 1, raised
        assert f"sp_threshold {requested}" in raised[0], raised[0]
        assert f"using sp_threshold={effective}" in raised[0], raised[0]
    else:
        assert not raised, raised


def _convert_under_cudagraphs(path: str, sizes: list[int], requested: int) -> dict:
    """On every rank: vLLM's model for ``path`` converted (engine form) under a
    compilation config that captures ``sizes``; the thresholds the layers got."""
    from vllm.config import CompilationConfig, ModelConfig, VllmConfig, \
        set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    from flashcomm.vllm import layers
    from flashcomm.vllm.standalone import init_vllm_tp

    init_vllm_tp()
    layers.install()
    cfg = VllmConfig(model_config=ModelConfig(model=path, skip_tokenizer_init=True,
                                              dtype="float32"))
    with set_current_vllm_config(cfg):
        model = initialize_model(vllm_config=cfg)
    cfg.compilation_config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE",
                                               cudagraph_capture_sizes=sizes)
    layers.convert_model(model, cfg, requested, gemm="engine")
    return {"layers": sorted({m._fc_state.sp_threshold for m in model.modules()
                              if getattr(m, "_fc_state", None) is not None}),
            "record": cfg.additional_config["flashcomm"]["_conversion"]}


def test_converted_layers_get_the_raised_threshold(llama, vllm_ranks):
    sizes = _capture_sizes(1024)
    for r in vllm_ranks(RELOAD_TP).run(_convert_under_cudagraphs, str(llama), sizes, 1000):
        assert r["layers"] == [1024], r
        assert r["record"]["sp_threshold"] == 1024, r["record"]
        assert r["record"]["sp_threshold_requested"] == 1000, r["record"]


def test_threshold_unchanged_without_cudagraphs_on_cpu(llama, fc_log):
    from flashcomm.vllm.layers import cudagraph_max_size, effective_sp_threshold

    cfg = _vllm_config(llama)  # vLLM's CPU platform: no CUDA graphs
    assert cudagraph_max_size(cfg) is None, cfg.compilation_config.cudagraph_capture_sizes
    assert effective_sp_threshold(cfg, 16) == 16
    assert not fc_log


def _off_flags(message: str) -> tuple[str, dict]:
    """The command-line flag and the Python compilation_config a refusal names."""
    cli = re.search(r"(-cc\.pass_config\.\w+=false)", message)
    py = re.search(r"compilation_config=(\{.*?\}\})", message)
    assert cli and py, message
    return cli.group(1), ast.literal_eval(py.group(1))


def test_fusion_pass_refusal_names_the_flag_that_turns_it_off(llama):
    from vllm.config import CompilationConfig, PassConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from flashcomm.vllm.layers import FlashcommUnsupportedError, check_config

    cfg = _vllm_config(llama, compilation_config=CompilationConfig(
        pass_config=PassConfig(fuse_allreduce_rms=True)))
    with pytest.raises(FlashcommUnsupportedError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert REFUSAL in msg and "fuse_allreduce_rms" in msg, msg
    cli, py = _off_flags(msg)
    assert cli == "-cc.pass_config.fuse_allreduce_rms=false", msg

    # vLLM's own command-line parser: the named flag turns the pass off (and its
    # opposite on, so the parse is not vacuous).
    def parsed(flag: str) -> bool:
        parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
        args = parser.parse_args(["--model", str(llama), flag])
        return EngineArgs.from_cli_args(args).compilation_config.pass_config \
            .fuse_allreduce_rms
    assert parsed(cli) is False
    assert parsed(cli.replace("=false", "=true")) is True
    # The Python spelling: a VllmConfig with it is accepted.
    check_config(_vllm_config(llama, compilation_config=CompilationConfig(**py)))


# ---------------------------------------------------------------------------------------
# Item 8: vLLM's layerwise reload of a converted model (flashcomm GEMM form)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_ranks():
    """Rank pools of this module only (vLLM's process-global state stays out of the
    other tests' ranks)."""
    from flashcomm.vllm.standalone import destroy_vllm_tp

    pools = RankPools(teardown=destroy_vllm_tp)
    try:
        yield pools
    finally:
        pools.close()


def _build_converted(path: str):
    """On a rank: vLLM's model for the checkpoint at ``path``, built by vLLM's
    ``initialize_model`` (which records the metadata its reload uses), converted in the
    ``flashcomm`` GEMM form, loaded and processed as vLLM's default loader does."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import (initialize_model,
                                                        process_weights_after_loading)

    from flashcomm.vllm import layers

    cfg = VllmConfig(model_config=ModelConfig(model=path, skip_tokenizer_init=True,
                                              dtype="float32"))
    with set_current_vllm_config(cfg):
        model = initialize_model(vllm_config=cfg)
        layers.convert_model(model, cfg, 16, gemm="flashcomm")
        get_model_loader(cfg.load_config).load_weights(model, cfg.model_config)
        process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
    return cfg, model


def _layer_state(model) -> dict:
    """Per converted linear: its derived buffers and its output on a fixed input."""
    out = {}
    for name, mod in model.named_modules():
        if getattr(mod, "_fc_state", None) is None or not hasattr(mod, "fc_weight"):
            continue
        width = mod.input_size_per_partition if hasattr(mod, "input_is_parallel") \
            else mod.input_size
        x = torch.randn(5, width, generator=torch.Generator().manual_seed(len(name)))
        y = mod(x)
        out[name] = {"out": (y[0] if isinstance(y, tuple) else y).clone(),
                     **{k: getattr(mod, k).clone() for k in DERIVED
                        if getattr(mod, k, None) is not None}}
    return out


def _reload_case(first: str, second: str) -> dict:
    """On every rank: load ``first``, reload ``second`` through vLLM's reload_weights;
    compare with a fresh load of ``second``. Returns the mismatches."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    from flashcomm.vllm import _compat, layers
    from flashcomm.vllm.standalone import init_vllm_tp

    init_vllm_tp()
    layers.install()
    cfg, model = _build_converted(first)
    before = _layer_state(model)
    with set_current_vllm_config(cfg):
        reload_weights(cfg, model, weights_iterator=None, weights_path=second,
                       is_checkpoint_format=True)
    after = _layer_state(model)
    _, fresh_model = _build_converted(second)
    fresh = _layer_state(fresh_model)
    group = _compat.symbol("get_tp_group")().device_group.group_name
    return {
        "layers": sorted(after),
        "stale": sorted(f"{n}.{k}" for n in after for k in after[n]
                        if not torch.equal(after[n][k], fresh[n][k])),
        "unchanged": sorted(n for n in after if torch.equal(after[n]["out"], before[n]["out"])),
        "record": cfg.additional_config.get("flashcomm", {}).get("_conversion", {}),
        "group": group}


@pytest.mark.parametrize("case", RELOAD_CASES, ids=[c[0] for c in RELOAD_CASES])
def test_reload_derives_flashcomm_buffers(tmp_path, vllm_ranks, case):
    name, first_args, second_args = case
    first = make_checkpoint(tmp_path, "first", "--arch", "llama", *first_args)
    second = make_checkpoint(tmp_path, "second", "--arch", "llama", *second_args)
    for r in vllm_ranks(RELOAD_TP).run(_reload_case, str(first), str(second)):
        assert len(r["layers"]) == 4 * 2, r["layers"]  # qkv, o, gate_up, down x 2 layers
        assert not r["stale"], f"after vLLM's reload, differ from a fresh load: {r['stale']}"
        assert not r["unchanged"], f"the reload changed nothing in {r['unchanged']}"
        # Item 9 on a converted model: the group is in the record (the cache key).
        assert r["record"]["group"] == r["group"], r["record"]
        assert r["record"]["sp_threshold"] == r["record"]["sp_threshold_requested"] == 16


# ---------------------------------------------------------------------------------------
# Item 9: the c10d group name is in vLLM's compile cache key
# ---------------------------------------------------------------------------------------

def test_group_name_enters_the_compile_cache_key(llama):
    from flashcomm.vllm.layers import record_conversion

    user = {"enable": True, "sp_threshold": 1000, "gemm": "auto"}  # --additional-config
    cfg = _vllm_config(llama, additional_config={"flashcomm": user})
    base = {"sp_threshold": 16, "threshold": -1, "gemm": "engine", "transport": "shm",
            "all_reduce": "", "version": "x"}
    hashes = []
    for group in ("0", "7"):
        record_conversion(cfg, {**base, "group": group})
        assert cfg.additional_config["flashcomm"]["_conversion"]["group"] == group
        # The user's keys stay as given (and their dict unchanged), beside the record.
        assert {k: v for k, v in cfg.additional_config["flashcomm"].items()
                if k != "_conversion"} == user == {"enable": True, "sp_threshold": 1000,
                                                   "gemm": "auto"}
        hashes.append(cfg.compute_hash())
    assert hashes[0] != hashes[1]
    record_conversion(cfg, {**base, "group": "0"})
    assert cfg.compute_hash() == hashes[0]


def test_record_refuses_an_additional_config_it_cannot_extend(llama):
    from flashcomm.vllm.layers import FlashcommUnsupportedError, record_conversion

    class Hashable:  # vLLM's SupportsHash form of additional_config
        def compute_hash(self) -> str:
            return "h"

    cfg = _vllm_config(llama)
    cfg.additional_config = Hashable()
    with pytest.raises(FlashcommUnsupportedError, match="additional_config is a Hashable"):
        record_conversion(cfg, {"group": "0"})


# ---------------------------------------------------------------------------------------
# Item 10: loaders that skip create_model
# ---------------------------------------------------------------------------------------

LOADERS = r"""
import torch
from flashcomm.vllm import plugin
plugin.register()
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import (BaseModelLoader, DefaultModelLoader,
    IpcModelLoader, TensorizerLoader, get_model_loader, register_model_loader)
from flashcomm.vllm.layers import FcState

for cls in (BaseModelLoader, TensorizerLoader, IpcModelLoader):
    print("WRAPPED", cls.__name__, getattr(cls.__dict__["load_model"], "_flashcomm_wrapped",
                                           False))
print("INHERITED", DefaultModelLoader.load_model is BaseModelLoader.load_model)


class _Loader(BaseModelLoader):
    def download_model(self, model_config):
        pass

    def load_weights(self, model, model_config):
        pass


# Defined after the plugin registered: it builds the model itself, as TensorizerLoader.
@register_model_loader("fc_direct")
class DirectLoader(_Loader):
    def load_model(self, vllm_config, model_config, prefix=""):
        return torch.nn.Sequential(torch.nn.Linear(2, 2))


# Its model carries converted modules (what create_model's conversion leaves).
@register_model_loader("fc_converted")
class ConvertedLoader(_Loader):
    def load_model(self, vllm_config, model_config, prefix=""):
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        model[0]._fc_state = FcState(group_name="0", sp_threshold=16)
        return model


for fmt in ("fc_direct", "fc_converted"):
    print("LOADING", fmt, flush=True)
    get_model_loader(LoadConfig(load_format=fmt)).load_model(vllm_config=None,
                                                            model_config=None)
print("DONE", flush=True)
"""


def test_loader_that_skips_create_model_is_reported():
    env = {**os.environ, "FLASHCOMM_ENABLE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", LOADERS], capture_output=True, text=True,
                          timeout=600, env=env)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0 and "DONE" in out, out[-3000:] + err[-3000:]
    # vLLM's loaders that build their model without create_model are watched.
    for cls in ("BaseModelLoader", "TensorizerLoader", "IpcModelLoader"):
        assert f"WRAPPED {cls} True" in out, out
    assert "INHERITED True" in out, out
    from flashcomm.vllm.plugin import UNCONVERTED_MARKER
    # vLLM's log stream (VLLM_LOGGING_STREAM) is stdout by default.
    warnings = [line for line in (out + err).splitlines() if UNCONVERTED_MARKER in line]
    assert len(warnings) == 1, out[-3000:] + err[-3000:]
    assert "DirectLoader" in warnings[0] and "'fc_direct'" in warnings[0], warnings[0]
    assert "WITHOUT flashcomm" in warnings[0], warnings[0]
