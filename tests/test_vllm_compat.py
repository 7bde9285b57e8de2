"""flashcomm.vllm._compat against the installed vLLM: the version gate (untested version
refused, FLASHCOMM_VLLM_ALLOW_UNTESTED=1 lets it run with a warning), a missing vLLM
symbol or configuration field is a refusal, and the fusion-pass check fails closed.

The plugin runs in subprocesses (register() patches vLLM's model loader process-wide), its
start-up check (``check_settings``, what ``EngineArgs.create_engine_config`` runs in the
process that starts the engine) as vLLM calls it; the other checks call _compat and
check_config directly. Skipped when vLLM is not
importable."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from _vllm_cases import REFUSAL, flashcomm_log, requires_vllm

pytestmark = requires_vllm

ROOT = Path(__file__).resolve().parents[1]

# Patches _compat as argv[1] says, runs the plugin's entry point as vLLM would, then the
# start-up check vLLM's create_engine_config runs (the plugin's hook), with argv[2] as
# additional_config (JSON).
REGISTER = r"""
import json, sys
from flashcomm.vllm import _compat, plugin
what = sys.argv[1]
if what == "version":
    _compat.installed_vllm_version = lambda: "0.99.0"
elif what == "symbol":
    module, _ = _compat.SYMBOLS["RowParallelLinear"]
    _compat.SYMBOLS["RowParallelLinear"] = (module, "RowParallelLinearRenamed")
plugin.register()
from vllm.engine.arg_utils import EngineArgs
assert EngineArgs.create_engine_config._flashcomm_wrapped
plugin.check_settings(json.loads(sys.argv[2]))
print("REGISTERED", plugin._REGISTERED)
"""


def _register(what: str, config: str = "{}", **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FLASHCOMM_VLLM_ALLOW_UNTESTED"}
    full.update(FLASHCOMM_ENABLE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-c", REGISTER, what, config], capture_output=True,
                          text=True, timeout=600, env=full)


@pytest.fixture
def compat_log():
    """WARNING+ records of the vllm.flashcomm logger."""
    with flashcomm_log() as records:
        yield records


def test_installed_version_is_tested():
    from flashcomm.vllm import _compat

    assert _compat.installed_vllm_version() in _compat.TESTED_VLLM_VERSIONS
    _compat.check_vllm_version()  # no refusal, no warning


def test_untested_version_is_refused(monkeypatch, compat_log):
    from flashcomm.vllm import _compat

    monkeypatch.delenv(_compat.ENV_ALLOW_UNTESTED, raising=False)
    monkeypatch.setattr(_compat, "installed_vllm_version", lambda: "0.99.0")
    with pytest.raises(_compat.FlashcommUnsupportedError) as e:
        _compat.check_vllm_version()
    msg = str(e.value)
    assert REFUSAL in msg and "vLLM 0.99.0" in msg and "0.32.0" in msg, msg
    assert "FLASHCOMM_VLLM_ALLOW_UNTESTED=1" in msg and "unset FLASHCOMM_ENABLE" in msg, msg
    assert not compat_log


def test_untested_version_allowed_by_override_with_warning(monkeypatch, compat_log):
    from flashcomm.vllm import _compat

    monkeypatch.setenv(_compat.ENV_ALLOW_UNTESTED, "1")
    monkeypatch.setattr(_compat, "installed_vllm_version", lambda: "0.99.0")
    _compat.check_vllm_version()
    assert [r.levelno for r in compat_log] == [logging.WARNING], compat_log
    assert "0.99.0" in compat_log[0].getMessage()


def test_plugin_refuses_untested_version():
    proc = _register("version")
    assert proc.returncode != 0 and "REGISTERED" not in proc.stdout, proc.stdout
    assert REFUSAL in proc.stderr and "vLLM 0.99.0" in proc.stderr, proc.stderr[-3000:]


def test_plugin_runs_untested_version_with_override():
    proc = _register("version", FLASHCOMM_VLLM_ALLOW_UNTESTED="1")
    assert proc.returncode == 0 and "REGISTERED True" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not a version flashcomm was tested with" in proc.stderr, proc.stderr[-3000:]
    # The same override from --additional-config (the variable says no).
    proc = _register("version", '{"flashcomm": {"allow_untested": true}}',
                     FLASHCOMM_VLLM_ALLOW_UNTESTED="0")
    assert proc.returncode == 0 and "REGISTERED True" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]


def test_plugin_refuses_when_a_vllm_symbol_is_missing():
    proc = _register("symbol")
    assert proc.returncode != 0 and "REGISTERED" not in proc.stdout, proc.stdout
    assert REFUSAL in proc.stderr, proc.stderr[-3000:]
    assert "vllm.model_executor.layers.linear.RowParallelLinearRenamed is missing" in \
        proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("entry", [("vllm.model_executor.layers.linear", "Gone"),
                                   ("vllm.no_such_module", "RowParallelLinear")],
                         ids=["attribute", "module"])
def test_missing_symbol_is_a_refusal(monkeypatch, entry):
    from flashcomm.vllm import _compat

    monkeypatch.setitem(_compat.SYMBOLS, "RowParallelLinear", entry)
    with pytest.raises(_compat.FlashcommUnsupportedError, match=REFUSAL) as e:
        _compat.symbol("RowParallelLinear")
    assert f"{entry[0]}.{entry[1]} is missing" in str(e.value)


def test_every_symbol_resolves_on_the_tested_version():
    from flashcomm.vllm import _compat

    for name in _compat.SYMBOLS:
        assert _compat.symbol(name) is not None, name


def _config(**parallel) -> SimpleNamespace:
    """A stand-in for VllmConfig with the fields check_config reads (a supported model)."""
    pc = {"pipeline_parallel_size": 1, "decode_context_parallel_size": 1,
          "prefill_context_parallel_size": 1, **parallel}
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(
            architectures=["LlamaForCausalLM"])),
        parallel_config=SimpleNamespace(**{k: v for k, v in pc.items() if v is not None}),
        lora_config=None, speculative_config=None, additional_config={},
        compilation_config=SimpleNamespace(pass_config=SimpleNamespace(
            fuse_allreduce_rms=False)))


def test_pass_check_fails_closed():
    from vllm.config import PassConfig

    from flashcomm.vllm import _compat

    assert _compat.collective_passes_on(PassConfig()) == []
    assert _compat.collective_passes_on(PassConfig(fuse_allreduce_rms=True)) == [
        "fuse_allreduce_rms"]
    # A pass name of another vLLM version is refused where present and on.
    assert _compat.collective_passes_on(SimpleNamespace(fuse_allreduce_rms=False,
                                                        enable_sp=True)) == ["enable_sp"]
    # A tested pass that is gone (renamed) is a refusal, not "off".
    with pytest.raises(_compat.FlashcommUnsupportedError, match="fuse_allreduce_rms"):
        _compat.collective_passes_on(SimpleNamespace())


def test_check_config_fails_closed_on_missing_fields():
    from flashcomm.vllm.layers import FlashcommUnsupportedError, check_config

    check_config(_config())  # the stand-in is accepted as it is
    cfg = _config()
    cfg.compilation_config.pass_config = SimpleNamespace()
    with pytest.raises(FlashcommUnsupportedError, match="fuse_allreduce_rms"):
        check_config(cfg)
    with pytest.raises(FlashcommUnsupportedError, match="decode_context_parallel_size"):
        check_config(_config(decode_context_parallel_size=None))
    cfg = _config()
    del cfg.lora_config
    with pytest.raises(FlashcommUnsupportedError, match="lora_config"):
        check_config(cfg)
