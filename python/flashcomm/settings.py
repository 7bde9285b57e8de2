"""Every flashcomm setting, in one table: its variable, its ``--additional-config`` key,
type, default, scope and one doc line, with the one grammar every reader uses.

* :data:`SETTINGS`: the table. ``scope``: ``library`` (read by the op library, C++ or
  Python, in any process), ``vllm`` (read by the vLLM plugin), ``debug`` (diagnostics a
  user may turn on), ``test`` (test-only hooks and the test suite's own variables:
  documented in DEVELOPERS.md, never in README), ``build`` (read by ``setup.py`` and the
  scripts, not at run time).
* Grammar (the C++ twin is ``csrc/core/settings.h``): an unset or empty variable means the
  default. Booleans are exactly ``1/0, true/false, yes/no, on/off`` in any case;
  integers are decimal, within the setting's bounds; enums are one of their words. Any
  other value is a :class:`SettingError` naming the variable (or the config key) and the
  accepted values.
* :func:`warn_unknown_env` (called by ``import flashcomm``) and
  :func:`warn_unknown_keys` (the plugin, for ``additional_config["flashcomm"]``): a name
  not in the table is a warning naming the closest valid one, once per process.
* :func:`markdown` / :func:`render`: the tables of README.md and DEVELOPERS.md are
  generated from this one (``python -m flashcomm.tools.settings_doc``).

This module imports neither torch nor vLLM.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

logger = logging.getLogger("flashcomm")

PREFIX = "FLASHCOMM_"
CONFIG_KEY = "flashcomm"  # vLLM's additional_config["flashcomm"]
SCOPES = ("library", "debug", "vllm", "test", "build")
KINDS = ("bool", "int", "float", "enum", "path")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BOOL_TEXT = "a boolean: 1/0, true/false, yes/no or on/off (any case)"

Value = Union[bool, int, float, str, None]


class SettingError(ValueError):
    """A setting's value does not parse; the message names the setting and the accepted
    values."""


@dataclass(frozen=True)
class Setting:
    """One setting. ``key``: its ``additional_config["flashcomm"]`` key ('' = variable
    only); ``words``: for ``enum`` the values, for ``bool`` / ``int`` extra words
    accepted as they are (``auto``); ``lo`` / ``hi``: inclusive bounds of an int or
    float (``lo_open``: ``lo`` itself excluded); ``reader``: which code reads it."""

    env: str
    kind: str
    default: Value
    doc: str
    scope: str
    key: str = ""
    words: tuple[str, ...] = ()
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    reader: str = "python"
    default_text: str = ""

    @property
    def test_only(self) -> bool:
        return self.scope == "test"

    def expected(self) -> str:
        """The accepted values, in words."""
        extra = " or ".join(f"'{w}'" for w in self.words)
        if self.kind == "bool":
            return f"{extra} or {BOOL_TEXT}" if extra else BOOL_TEXT
        if self.kind == "enum":
            return "one of " + ", ".join(f"'{w}'" for w in self.words)
        if self.kind == "path":
            return "a path"
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            bounds.append(f"<= {_num(self.hi)}")
        what = "an integer" if self.kind == "int" else "a number"
        what += f" {' and '.join(bounds)}" if bounds else ""
        return f"{extra} or {what}" if extra else what

    def parse(self, value: Any, where: str = "") -> Value:
        """``value`` (a variable's text, or a JSON value from ``additional_config``) as this
        setting's type. Raises :class:`SettingError` naming ``where`` (default: the
        variable) and the accepted values."""
        where = where or self.env
        fail = SettingError(f"flashcomm: {where} must be {self.expected()}, got {value!r}")
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in self.words:
                return text.lower()
        elif self.kind in ("enum", "path"):
            raise fail
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str):
                word = value.strip().lower()
                if word in TRUE_WORDS or word in FALSE_WORDS:
                    return word in TRUE_WORDS
            raise fail
        if self.kind == "enum":
            raise fail
        if self.kind == "path":
            if not value.strip():
                raise fail
            return value.strip()
        number: Union[int, float]
        if isinstance(value, bool):
            raise fail
        if self.kind == "int":
            if isinstance(value, int):
                number = value
            elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                number = int(value.strip())
            else:
                raise fail
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise fail from None
            if number != number or number in (float("inf"), float("-inf")):
                raise fail
        if self.kind == "int" and not -INT64_MAX - 1 <= number <= INT64_MAX:
            raise fail  # what the C++ readers hold
        if self.lo is not None and (number < self.lo or (self.lo_open and number == self.lo)):
            raise fail
        if self.hi is not None and number > self.hi:
            raise fail
        return number

    def from_env(self, environ: Optional[Mapping[str, str]] = None) -> Value:
        """This setting from the environment (unset or empty: the default)."""
        raw = (os.environ if environ is None else environ).get(self.env, "")
        return self.default if not raw.strip() else self.parse(raw)

    def config_where(self) -> str:
        return f'additional_config["{CONFIG_KEY}"]["{self.key}"]'


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


INT64_MAX = 2**63 - 1

SETTINGS: tuple[Setting, ...] = (
    # --- the op library (C++ unless said) -------------------------------------------
    Setting("FLASHCOMM_TRANSPORT", "enum", "auto", scope="library", key="transport",
            words=("auto", "shm", "c10d"), reader="c++", default_text="`auto`",
            doc="`auto`, `shm` (an error saying why when it cannot be used) or `c10d`"),
    Setting("FLASHCOMM_SHM_BYTES", "int", 2 << 20, scope="library", key="shm_bytes",
            lo=64 << 10, hi=2 << 40, reader="c++", default_text="2097152 (2 MiB)",
            doc="shared memory per rank per group (two slots of half of it); larger "
                "messages stream through it in steps small enough to stay in cache (a "
                "32 MiB budget measured 1.3-3x slower on 32 MiB all-reduces); one row of "
                "a collective over the group (tp x row bytes for a reduce-scatter) must "
                "fit a slot"),
    Setting("FLASHCOMM_SHM_TWO_SHOT_BYTES", "int", -1, scope="library",
            key="shm_two_shot_bytes", lo=-1, reader="c++",
            doc="all-reduce steps of at least this many bytes per rank run two-shot; -1: "
                "262144 (256 KiB) at tp >= 3, never at tp = 2 (one-shot reads no more "
                "there); 0: always. Must be the same on every rank (agreed at first use)"),
    Setting("FLASHCOMM_SHM_OVERLAP", "bool", "auto", scope="library", key="shm_overlap",
            words=("auto",), reader="c++", default_text="`auto`",
            doc="on: the reductions of the pipelined GEMM + reduce-scatter run on a "
                "helper thread, overlapped with the next chunk's GEMM; off: back to back "
                "on the calling thread; `auto`: on when the CPUs of this rank and of the "
                "ranks that share CPUs with it outnumber all their intra-op threads (e.g. "
                "ranks bound to 8 cores each, running 7 threads). Local to each rank: it "
                "changes which thread sums, not what is exchanged"),
    Setting("FLASHCOMM_SHM_YIELD_US", "int", 5000, scope="library", key="shm_yield_us",
            lo=0, hi=60_000_000, reader="c++",
            doc="how long (µs) a waiting rank spins / yields before it sleeps (sleeping "
                "adds a timer's latency to a step); 0: sleep at once"),
    Setting("FLASHCOMM_BITWISE_MODES", "bool", False, scope="library", key="bitwise_modes",
            reader="c++",
            doc="bitwise mode invariance on every transport and tp (\"Numerics across the "
                "threshold\"); process-wide, agreed at a group's first use / "
                "`flashcomm.init`"),
    Setting("FLASHCOMM_LIB", "path", None, scope="library", reader="python",
            default_text="the package's copy",
            doc="the compiled op library `import flashcomm` loads (a "
                "`libflashcomm_ops.so` built against this torch)"),
    # --- diagnostics -----------------------------------------------------------------
    Setting("FLASHCOMM_DEBUG_CHECK", "bool", False, scope="debug", key="debug_check",
            reader="c++",
            doc="before each c10d collective the ranks all-gather its fingerprint (op, n, "
                "mode, strategy, kind, bytes) and a mismatch is an error on every rank"),
    Setting("FLASHCOMM_DEBUG_FORCE_COLLECTIVES", "bool", False, scope="debug",
            key="debug_force_collectives", reader="c++",
            doc="a one-rank group takes every multi-rank path (pipelined chunks, sharded "
                "mode, agreement), e.g. one GPU testing NCCL and graph capture"),
    Setting("FLASHCOMM_DEBUG_POISON", "bool", False, scope="debug", key="debug_poison",
            reader="c++",
            doc="the don't-care rows of the layout-invariant ops' outputs become NaN, so a "
                "consumer that reads them poisons its result (read once per process)"),
    # --- the vLLM plugin ---------------------------------------------------------------
    Setting("FLASHCOMM_ENABLE", "bool", False, scope="vllm", key="enable",
            doc="turn flashcomm on in vLLM (off: vLLM unchanged); `flashcomm serve` "
                "defaults the variable to 1"),
    Setting("FLASHCOMM_SP_THRESHOLD", "int", "auto", scope="vllm", key="sp_threshold",
            words=("auto",), lo=0,
            doc="forwards with more tokens than this run sequence-parallel (sharded), the "
                "others as plain TP (replicated); raised to vLLM's largest CUDA-graph "
                "capture size; `auto`: the crossover of the model's own boundary, measured "
                "at start-up and cached (README, \"sp_threshold=auto\")"),
    Setting("FLASHCOMM_TUNING_FILE", "path", None, scope="vllm", key="tuning_file",
            default_text="none",
            doc="a table written by `flashcomm tune`: its kernel crossovers apply, and its "
                "`sp_threshold`, when it has one, replaces `auto`"),
    Setting("FLASHCOMM_THRESHOLD", "int", -1, scope="vllm", key="threshold", lo=-1,
            default_text="-1 (auto)",
            doc="the pipelining threshold of flashcomm's fused GEMMs (`gemm=flashcomm` "
                "form only; no effect in the `engine` form, the CPU default); -1: the "
                "tuning table's, else 1000"),
    Setting("FLASHCOMM_VLLM_GEMM", "enum", "auto", scope="vllm", key="gemm",
            words=("auto", "engine", "flashcomm"), default_text="`auto`",
            doc="which kernels compute the converted layers' GEMMs: `engine` (vLLM's), "
                "`flashcomm` (its fused ops), `auto`: `engine` on CPU and for W8A8, "
                "`flashcomm` otherwise"),
    Setting("FLASHCOMM_VLLM_ALL_REDUCE", "bool", "auto", scope="vllm",
            key="vllm_all_reduce", words=("auto",), default_text="`auto`",
            doc="where the replicated path all-reduces: on: vLLM's own communicator "
                "(`vllm::all_reduce`); off: flashcomm's transport; `auto`: flashcomm's when "
                "its transport is shared memory (as on CPU), vLLM's otherwise"),
    Setting("FLASHCOMM_STATS_FILE", "path", None, scope="vllm", key="stats_file",
            default_text="none",
            doc="each worker keeps `<path>.<pid>` (JSON: rank, converted modules, "
                "`flashcomm.stats()`) up to date while it runs"),
    Setting("FLASHCOMM_STATS_INTERVAL", "float", 10.0, scope="vllm", key="stats_interval",
            lo=0, lo_open=True, default_text="10",
            doc="seconds between two rewrites of the stats file"),
    Setting("FLASHCOMM_VLLM_ALLOW_UNTESTED", "bool", False, scope="vllm",
            key="allow_untested",
            doc="run on a vLLM version flashcomm was not tested with (refused otherwise), "
                "with a warning"),
    # --- test-only hooks (DEVELOPERS.md) -------------------------------------------------
    Setting("FLASHCOMM_DEBUG_THROW", "enum", None, scope="test", words=("gemm", "sum"),
            reader="c++", default_text="unset",
            doc="`gemm`: a C++ exception from the GEMM of every fused reduction step; "
                "`sum`: from every shared-memory sum"),
    Setting("FLASHCOMM_DEBUG_SHM_UNMAPPABLE", "bool", False, scope="test", reader="c++",
            doc="this rank behaves as if it could not map its peers' shared-memory "
                "segments (the fallback to c10d)"),
    Setting("FLASHCOMM_DEBUG_SHM_DIE_AFTER_CREATE", "bool", False, scope="test",
            reader="c++",
            doc="this rank SIGKILLs itself right after creating its shared-memory segment"),
    Setting("FLASHCOMM_VLLM_TEST_CPU", "enum", "", scope="test",
            words=("", "no-amx", "avx512", "avx2", "default"), default_text="unset",
            doc="every vLLM engine and server of the tests runs in this CPU view "
                "(`flashcomm.tools.cpu_view`)"),
    Setting("FLASHCOMM_VLLM_TEST_TIMEOUT", "int", None, scope="test", lo=1,
            default_text="1200 (engines), 900 (servers)",
            doc="seconds a test waits for a vLLM engine or server"),
    Setting("FLASHCOMM_BENCH_STEP_TRACE", "path", None, scope="test", default_text="unset",
            doc="`benchmarks/serve_bench.py`'s servers: each worker appends one JSON line "
                "per engine step (tokens, requests, modes counted) to `PATH.rank<R>.jsonl`"),
    Setting("FLASHCOMM_FUZZ_EXAMPLES", "int", 25, scope="test", lo=1,
            doc="hypothesis examples per property test"),
    Setting("FLASHCOMM_FUZZ_DERANDOMIZE", "bool", True, scope="test",
            doc="property tests draw the same examples every run"),
    Setting("FLASHCOMM_TEST_CPU_VIEW", "enum", "", scope="test",
            words=("", "no-amx", "avx512", "avx2", "default"), default_text="unset",
            doc="internal: the CPU view a test's child process runs in (tests/_isa.py)"),
    Setting("FLASHCOMM_TEST_SERVER_ID", "path", None, scope="test", default_text="unset",
            doc="internal: marks the processes of one test server (tests/test_vllm_serve.py)"),
    Setting("FLASHCOMM_NORM_ISA_CHILD", "path", None, scope="test", default_text="unset",
            doc="internal: marks a test's child process (tests/test_norm.py)"),
    Setting("FLASHCOMM_QUANT_ISA_CHILD", "path", None, scope="test", default_text="unset",
            doc="internal: marks a test's child process (tests/test_quant_kernels.py)"),
    Setting("FLASHCOMM_W8A8_VIEW_CHILD", "path", None, scope="test", default_text="unset",
            doc="internal: marks a test's child process (tests/test_w8a8.py)"),
    Setting("FLASHCOMM_PACKED_VIEW_CHILD", "path", None, scope="test", default_text="unset",
            doc="internal: marks a test's child process (tests/test_packed.py)"),
    Setting("FLASHCOMM_VLLM_LM_VIEW_CHILD", "path", None, scope="test", default_text="unset",
            doc="internal: marks a test's child process (tests/test_vllm_linear_method.py)"),
    # --- build (setup.py, scripts) ---------------------------------------------------------
    Setting("FLASHCOMM_BUILD_TESTS", "bool", False, scope="build",
            doc="`setup.py` also builds the GoogleTest suites"),
    Setting("FLASHCOMM_SANITIZE", "bool", False, scope="build",
            doc="`setup.py` builds with AddressSanitizer + UndefinedBehaviorSanitizer"),
    Setting("FLASHCOMM_BUILD_DIR", "path", None, scope="build", default_text="build/cmake",
            doc="`setup.py`'s CMake build directory"),
    Setting("FLASHCOMM_JOBS", "int", None, scope="build", lo=1,
            default_text="the CPU count", doc="`setup.py`'s parallel build jobs"),
    Setting("FLASHCOMM_CACHE_DIR", "path", None, scope="build",
            default_text="~/.cache/flashcomm",
            doc="where `scripts/fetch_torch_wheel.sh` keeps downloaded torch wheels"),
)

BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS if s.key}
# additional_config["flashcomm"] keys flashcomm itself writes: the plugin's conversion
# record (what the converted layers bake in; part of vLLM's compile cache key).
RECORD_KEY = "_conversion"
RESERVED_KEYS = (RECORD_KEY,)

assert len(BY_ENV) == len(SETTINGS) and all(s.env.startswith(PREFIX) for s in SETTINGS)
assert all(s.scope in SCOPES and s.kind in KINDS for s in SETTINGS)
assert not any(s.key and s.scope in ("test", "build") for s in SETTINGS)


def conversion_record(additional_config: Any) -> dict[str, Any]:
    """A copy of what the vLLM plugin's conversion recorded in
    ``additional_config["flashcomm"][RECORD_KEY]`` (the settings the converted layers
    bake in, which enter vLLM's compile cache key); {} if nothing."""
    section = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    record = section.get(RECORD_KEY) if isinstance(section, dict) else None
    return dict(record) if isinstance(record, dict) else {}


def setting(name: str) -> Setting:
    """The setting of a variable name or config key (KeyError otherwise)."""
    return BY_ENV[name] if name in BY_ENV else BY_KEY[name]


def _closest(name: str, candidates: Sequence[str]) -> Optional[str]:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


_WARNED_PAIRS: set[tuple[str, str]] = set()  # (kind, name) already warned about


def unknown_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, Optional[str]]:
    """``FLASHCOMM_*`` variables of ``environ`` (default: this process's) that are no
    setting -> the closest valid variable (None if none is close)."""
    env = os.environ if environ is None else environ
    return {name: _closest(name, list(BY_ENV)) for name in sorted(env)
            if name.startswith(PREFIX) and name not in BY_ENV}


def warn_unknown_env(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Logs a warning for each unknown ``FLASHCOMM_*`` variable (once per process and
    name); returns the messages it logged."""
    logged = []
    for name, close in unknown_env(environ).items():
        if ("env", name) in _WARNED_PAIRS:
            continue
        _WARNED_PAIRS.add(("env", name))
        hint = f"did you mean {close}?" if close else "see README.md, \"Configuration\""
        msg = f"flashcomm: unknown environment variable {name} is ignored; {hint}"
        logger.warning("%s", msg)
        logged.append(msg)
    return logged



def config_section(additional_config: Any) -> dict[str, Any]:
    """The user's ``additional_config["flashcomm"]`` (without the keys flashcomm writes);
    {} when absent. Raises :class:`SettingError` when it is not a JSON object."""
    if not isinstance(additional_config, Mapping):
        return {}
    section = additional_config.get(CONFIG_KEY)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise SettingError(f'flashcomm: additional_config["{CONFIG_KEY}"] must be a JSON '
                           f"object of settings ({', '.join(sorted(BY_KEY))}), got "
                           f"{section!r}")
    return {k: v for k, v in section.items() if k not in RESERVED_KEYS}


def warn_unknown_keys(section: Mapping[str, Any],
                      log: Optional[logging.Logger] = None) -> list[str]:
    """Logs a warning (to ``log``, default this module's logger) for each key of
    ``additional_config["flashcomm"]`` that is no setting (once per process and key);
    returns the messages it logged."""
    logged = []
    for key in sorted(section):
        if key in BY_KEY or ("key", key) in _WARNED_PAIRS:
            continue
        _WARNED_PAIRS.add(("key", key))
        close = _closest(str(key), list(BY_KEY))
        hint = f"did you mean '{close}'?" if close else f"valid keys: {', '.join(sorted(BY_KEY))}"
        msg = (f'flashcomm: unknown key \'{key}\' in additional_config["{CONFIG_KEY}"] is '
               f"ignored; {hint}")
        (log or logger).warning("%s", msg)
        logged.append(msg)
    return logged


def resolve(s: Setting, section: Mapping[str, Any],
            environ: Optional[Mapping[str, str]] = None) -> tuple[Value, str]:
    """``s`` from ``additional_config["flashcomm"]`` (``section``) first, then its
    variable, then the default; returns (value, where it came from: the config key's
    path, the variable name or "default")."""
    if s.key and s.key in section:
        return s.parse(section[s.key], s.config_where()), s.config_where()
    env = os.environ if environ is None else environ
    if env.get(s.env, "").strip():
        return s.parse(env[s.env]), s.env
    return s.default, "default"


# --- generated documentation --------------------------------------------------------------

def _default_text(s: Setting) -> str:
    if s.default_text:
        return s.default_text
    if s.kind == "bool" and isinstance(s.default, bool):
        return "on" if s.default else "off"
    if s.default is None:
        return "unset"
    return _num(s.default) if isinstance(s.default, (int, float)) else f"`{s.default}`"


def _type_text(s: Setting) -> str:
    if s.kind == "bool":
        return ("`auto` or boolean" if s.words else "boolean")
    if s.kind == "enum":
        return " \\| ".join(f"`{w}`" for w in s.words if w)
    if s.kind == "path":
        return "path"
    extra = "".join(f"`{w}` or " for w in s.words)
    bounds = f" >= {_num(s.lo)}" if s.lo is not None and not s.lo_open else (
        f" > {_num(s.lo)}" if s.lo is not None else "")
    return f"{extra}{'integer' if s.kind == 'int' else 'seconds'}{bounds}"


def markdown(scope: str) -> str:
    """The Markdown table of one scope (``library`` includes ``debug``)."""
    scopes = ("library", "debug") if scope == "library" else (scope,)
    rows = [s for s in SETTINGS if s.scope in scopes]
    if scope == "vllm":
        lines = ["| `additional_config` key | variable | type | default | meaning |",
                 "|---|---|---|---|---|"]
        lines += [f"| `{s.key}` | `{s.env}` | {_type_text(s)} | {_default_text(s)} | {s.doc} |"
                  for s in rows]
    else:
        lines = ["| variable | config key | type | default | meaning |",
                 "|---|---|---|---|---|"]
        lines += [f"| `{s.env}` | {f'`{s.key}`' if s.key else '-'} | {_type_text(s)} | "
                  f"{_default_text(s)} | {s.doc} |" for s in rows]
    return "\n".join(lines) + "\n"


_BLOCK = re.compile(r"(<!-- settings:(\w+) -->\n)(.*?)(<!-- /settings:\2 -->)", re.S)


def render(text: str) -> str:
    """``text`` with every generated block replaced by the current table."""
    def table(m: re.Match) -> str:
        if m.group(2) not in SCOPES:
            raise SettingError(f"unknown settings block '{m.group(2)}'")
        return m.group(1) + markdown(m.group(2)) + m.group(4)
    return _BLOCK.sub(table, text)


def generated_blocks(text: str) -> list[str]:
    """The scopes of the generated blocks in ``text``."""
    return [m.group(2) for m in _BLOCK.finditer(text)]
