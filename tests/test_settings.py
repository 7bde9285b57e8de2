"""The settings table (python/flashcomm/settings.py) and its grammar: booleans are exactly
1/0, true/false, yes/no, on/off in any case, everything else an error naming the setting
and the accepted values (in Python here, in C++ through the library and
tests/cpp/test_core.cpp); the vLLM plugin takes each setting from
``additional_config["flashcomm"]`` first, then the variable, then the default; an unknown
variable or key is a warning naming the closest valid one; README.md and DEVELOPERS.md
hold the tables generated from it. No vLLM engine starts here (the plugin's settings are
resolved by the same function create_model calls; the served path is
tests/test_vllm_serve.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flashcomm
from flashcomm import settings
from flashcomm.settings import SettingError

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCOMM_")
           or k == "FLASHCOMM_LIB"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.mark.parametrize("text,value", [("1", True), ("TRUE", True), (" yes ", True),
                                        ("On", True), ("0", False), ("false", False),
                                        ("NO", False), ("off", False)])
def test_boolean_words(text, value):
    assert settings.setting("FLASHCOMM_DEBUG_CHECK").parse(text) is value


@pytest.mark.parametrize("text", ["y", "2", "enable", "", "truee"])
def test_other_boolean_text_is_an_error_naming_the_variable(text):
    with pytest.raises(SettingError) as e:
        settings.setting("FLASHCOMM_ENABLE").parse(text)
    assert str(e.value) == (f"flashcomm: FLASHCOMM_ENABLE must be a boolean: 1/0, true/false, "
                            f"yes/no or on/off (any case), got {text!r}")


@pytest.mark.parametrize("key,value,expected", [
    ("sp_threshold", "lots", "'auto' or an integer >= 0"),
    ("sp_threshold", -1, "'auto' or an integer >= 0"),
    ("sp_threshold", True, "'auto' or an integer >= 0"),
    ("sp_threshold", 2**64, "'auto' or an integer >= 0"),
    ("threshold", "1e3", "an integer >= -1"),
    ("stats_interval", 0, "a number > 0"),
    ("gemm", "fast", "one of 'auto', 'engine', 'flashcomm'"),
    ("vllm_all_reduce", "maybe", "'auto' or a boolean"),
    ("shm_bytes", 4096, "an integer >= 65536 and <= 2199023255552"),
    ("enable", 2, "a boolean")])
def test_bad_config_values_name_the_key(key, value, expected):
    s = settings.setting(key)
    with pytest.raises(SettingError) as e:
        s.parse(value, s.config_where())
    msg = str(e.value)
    assert msg.startswith(f'flashcomm: additional_config["flashcomm"]["{key}"] must be '
                          f"{expected}"), msg
    assert msg.endswith(f"got {value!r}"), msg


def test_json_values_parse_as_their_type():
    assert settings.setting("sp_threshold").parse(512) == 512
    assert settings.setting("sp_threshold").parse("AUTO") == "auto"
    assert settings.setting("enable").parse(True) is True
    assert settings.setting("enable").parse(0) is False
    assert settings.setting("stats_interval").parse("0.5") == 0.5
    assert settings.setting("vllm_all_reduce").parse("auto") == "auto"


def test_table_defaults_are_the_librarys():
    # The plugin measures its threshold by default; the library's ops keep their default.
    assert settings.setting("sp_threshold").default == "auto"
    assert isinstance(flashcomm.DEFAULT_SP_THRESHOLD, int)
    assert settings.setting("shm_bytes").default == flashcomm.ops.DEFAULTS["shm_bytes"]
    assert settings.setting("threshold").default == -1
    assert not any(s.key for s in settings.SETTINGS if s.test_only)


def test_every_flashcomm_variable_the_code_reads_is_in_the_table():
    read = set()
    patterns = [re.compile(r'getenv\("(FLASHCOMM_[A-Z0-9_]+)"\)'),
                re.compile(r'environ(?:\.get\(|\[|\.pop\()"(FLASHCOMM_[A-Z0-9_]+)"'),
                re.compile(r'env_(?:bool|int|word|auto_bool)\("(FLASHCOMM_[A-Z0-9_]+)"'),
                re.compile(r'int_from_env\("(FLASHCOMM_[A-Z0-9_]+)"'),
                re.compile(r'^\w*ENV\w* = "(FLASHCOMM_[A-Z0-9_]+)"', re.M)]
    for folder in ("python", "csrc", "tests", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".cpp", ".h") and path.name != "test_settings.py":
                text = path.read_text(errors="replace")
                for p in patterns:
                    read.update(p.findall(text))
    read.update(re.findall(r'environ\.get\("(FLASHCOMM_[A-Z0-9_]+)"',
                           (ROOT / "setup.py").read_text()))
    assert len(read) >= 25, sorted(read)
    assert sorted(read - set(settings.BY_ENV)) == []


def test_plugin_settings_config_first_then_variable_then_default(monkeypatch):
    from flashcomm.vllm.plugin import resolve_settings

    for name in settings.BY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLASHCOMM_SP_THRESHOLD", "7")
    monkeypatch.setenv("FLASHCOMM_STATS_INTERVAL", "3")
    monkeypatch.setenv("FLASHCOMM_VLLM_GEMM", "not-read")  # the config's key wins
    got = resolve_settings({"flashcomm": {
        "enable": "yes", "sp_threshold": 64, "gemm": "engine", "transport": "shm",
        "shm_overlap": False, "_conversion": {"group": "0"}}})
    assert (got.enable, got.sp_threshold, got.gemm, got.stats_interval) == (
        True, 64, "engine", 3.0)
    assert (got.threshold, got.vllm_all_reduce, got.stats_file, got.tuning_file) == (
        -1, None, None, None)
    assert dict(got.library) == {"FLASHCOMM_TRANSPORT": "shm", "FLASHCOMM_SHM_OVERLAP": "0"}
    sources = dict(got.sources)
    assert sources["sp_threshold"] == 'additional_config["flashcomm"]["sp_threshold"]'
    assert sources["stats_interval"] == "FLASHCOMM_STATS_INTERVAL"
    assert sources["threshold"] == "default"
    # Without the config, the variables; flashcomm off: the others are not even read.
    monkeypatch.setenv("FLASHCOMM_VLLM_GEMM", "flashcomm")
    assert resolve_settings(None).enable is False
    monkeypatch.setenv("FLASHCOMM_ENABLE", "on")
    env_only = resolve_settings({})
    assert (env_only.enable, env_only.sp_threshold, env_only.gemm) == (True, 7, "flashcomm")
    with pytest.raises(SettingError, match=r'\["flashcomm"\] must be a JSON object'):
        resolve_settings({"flashcomm": "on"})


def test_unknown_config_key_warns_once_with_the_closest(caplog):
    from flashcomm.vllm.plugin import resolve_settings

    with caplog.at_level(logging.WARNING, logger="vllm.flashcomm"):
        for _ in range(2):
            resolve_settings({"flashcomm": {"enable": True, "sp_treshold": 5}})
    warned = [r.getMessage() for r in caplog.records if "sp_treshold" in r.getMessage()]
    assert warned == ["flashcomm: unknown key 'sp_treshold' in additional_config[\"flashcomm\"] "
                      "is ignored; did you mean 'sp_threshold'?"], warned


def test_misspelt_variable_warns_at_import():
    proc = subprocess.run([sys.executable, "-c", "import flashcomm, flashcomm.settings as s; "
                           "s.warn_unknown_env(); print('OK')"],
                          capture_output=True, text=True, timeout=300,
                          env=_env(FLASHCOMM_SP_THRESOLD="64", FLASHCOMM_DEBUG_CHECK="1"))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "unknown environment" in line]
    assert lines == ["flashcomm: unknown environment variable FLASHCOMM_SP_THRESOLD is "
                     "ignored; did you mean FLASHCOMM_SP_THRESHOLD?"], proc.stderr[-3000:]


# One process, two C++ readers: FLASHCOMM_BITWISE_MODES=True is on (it once took only
# 0 / 1), and a bad FLASHCOMM_DEBUG_POISON is an error at the first norm call that
# reads it (on a one-rank group), not a crash.
GRAMMAR = r"""
import sys, torch, torch.distributed as dist, flashcomm
print("BITWISE", flashcomm.bitwise_modes(), flush=True)
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
x = torch.ones(8, 4)
try:
    flashcomm.sp_add_rms_norm(x, None, torch.ones(4), 1e-6, None, 1)
    print("NO ERROR")
except RuntimeError as e:
    print("ERROR", str(e).splitlines()[0])
"""


def test_cpp_reads_the_same_grammar(tmp_path):
    proc = subprocess.run([sys.executable, "-c", GRAMMAR, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300,
                          env=_env(FLASHCOMM_BITWISE_MODES="True", FLASHCOMM_DEBUG_POISON="y"))
    assert "BITWISE True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert ("ERROR FLASHCOMM_DEBUG_POISON must be a boolean: 1/0, true/false, yes/no or "
            "on/off (any case), got 'y'") in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("doc", ["README.md", "DEVELOPERS.md"])
def test_generated_tables_are_current(doc):
    text = (ROOT / doc).read_text()
    assert settings.generated_blocks(text), f"{doc} has no generated settings table"
    assert settings.render(text) == text, (
        f"{doc}: a settings table is stale; run python -m flashcomm.tools.settings_doc "
        f"--write {doc}")


def test_user_docs_hold_no_test_only_setting():
    readme = (ROOT / "README.md").read_text()
    for s in settings.SETTINGS:
        if s.test_only:
            assert s.env not in readme, s.env
    assert settings.generated_blocks(readme) == ["library", "vllm"]
    import torch
    ops = torch._C._dispatch_get_all_op_names()
    public = sorted(o for o in ops if o.startswith("flashcomm::"))
    hooks = sorted(o for o in ops if o.startswith("flashcomm_testing::"))
    assert public and not [o for o in public if "::_" in o or "testing" in o], public
    assert hooks == ["flashcomm_testing::all_reduce", "flashcomm_testing::set_capturing",
                     "flashcomm_testing::set_debug_poison"], hooks
