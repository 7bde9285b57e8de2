"""Smoke run of ``benchmarks/serve_bench.py`` (issue 22), so that the serving benchmark
keeps working: one ``flashcomm serve`` server with flashcomm on (the off server is the
same command with FLASHCOMM_ENABLE=0, which tests/test_vllm_serve.py starts), the tests'
tiny Qwen3 width with its trained tokenizer, vLLM's eager backend, four requests at the
saturation rate (all at once) and at half the request throughput that reached. Not a timing test: it checks that the benchmark produces its
results files with sane fields, that the per-step trace saw both modes and that every
step's counted mode follows the rule (sharded iff tokens > sp_threshold).

Cheap checks of the argument errors and of the checkpoint's tokenizer run without a
server.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _vllm_cases import requires_vllm

ROOT = Path(__file__).resolve().parents[1]
SP_THRESHOLD = 64


def _serve_bench():
    spec = importlib.util.spec_from_file_location("serve_bench",
                                                  ROOT / "benchmarks" / "serve_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("serve_bench", mod)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["serve_bench"])
    return sys.modules["serve_bench"]


def test_bad_arguments_name_the_option():
    sb = _serve_bench()
    for parse, bad, name in ((sb.parse_mix, "0.5:10-5:1-2", "--mix"),
                             (sb.parse_mix, "half:1-2:1-2", "--mix"),
                             (sb.parse_rates, "1,0", "--rates"),
                             (sb.parse_order, "on,of", "--order")):
        with pytest.raises(argparse.ArgumentTypeError, match=name):
            parse(bad)
    with pytest.raises(SystemExit, match="--max-model-len"):
        sb.config_from_args(sb.build_parser().parse_args(["--max-model-len", "512"]))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"),
                           "/nonexistent", "--tokenizer", "--vocab-size", "300",
                           "--tokenizer-vocab", "400"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--tokenizer-vocab" in proc.stderr, proc.stderr


@requires_vllm
def test_serve_bench_smoke(tmp_path):
    sb = _serve_bench()
    out = tmp_path / "serve_smoke"
    rc = sb.main(["--preset", "tiny", "--layers", "2", "--dtype", "float32",
                  "--compile", "eager", "--order", "on", "--rates", "0.5x,inf",
                  "--num-prompts", "4", "--warmup-per-class", "0",
                  "--mix", "0.5:20-40:4-8,0.5:100-150:4-8", "--long-tokens", "100",
                  "--max-model-len", "512", "--sp-threshold", str(SP_THRESHOLD),
                  "--min-free-gib", "0", "--work-dir", str(tmp_path / "work"),
                  "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    text = out.with_suffix(".txt").read_text()
    assert doc["provenance"]["torch"] and doc["provenance"]["cpu_model"], doc["provenance"]
    assert "TTFT p50 ms on / off" in text and "tiny width, 2 layers" in text, text
    (model,) = doc["models"]
    assert model["sp_threshold"] == SP_THRESHOLD, model["sp_threshold"]
    assert model["tokenizer_entries"] == model["model_config"]["vocab_size"] == 512
    (srv,) = model["servers"]
    assert srv["mode"] == "on" and srv["active_lines"] == 2, srv
    assert list(srv["runs"]) == ["inf", "0.5x"], srv["runs"]  # inf first: it sets 0.5x
    assert srv["runs"]["0.5x"]["rate_rps"] == pytest.approx(
        0.5 * srv["runs"]["inf"]["request_throughput"], rel=1e-2), srv["runs"]
    assert srv["runs"]["0.5x"]["completed"] == 4, srv["runs"]["0.5x"]
    run = srv["runs"]["inf"]
    prompts = [json.loads(line) for line in
               (tmp_path / "work" / "prompts" / "prompts_inf.jsonl").read_text().splitlines()]
    assert run["completed"] == 4 and run["failed"] == 0, run
    # Greedy with EOS ignored: every request generated exactly its output length.
    assert run["total_output_tokens"] == sum(p["output_tokens"] for p in prompts), run
    for key in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                "output_throughput"):
        assert run[key] is not None and run[key] > 0, (key, run)
    assert run["p99_ttft_ms"] >= run["median_ttft_ms"], run
    assert run["long_requests"] >= 1 and run["median_ttft_long_ms"] > 0, run
    # The per-step trace: the four prefills cross the threshold, the decodes do not;
    # the workers' counters say which mode each step ran, as the rule says.
    trace = srv["trace"]["summary"]["inf"]
    assert trace["steps"] >= max(p["output_tokens"] for p in prompts), trace
    assert trace["modes"].get("sharded", 0) >= 1 and trace["modes"].get("replicated", 0) >= 1, \
        trace
    assert trace["above"] >= 1 and trace["rule_mismatches"] == 0, trace
    row = model["summary"]["inf"]
    assert row["median_tpot_ms"]["on"] == run["median_tpot_ms"], row
    assert row["median_tpot_ms"]["off"] is None and row["median_tpot_ms"]["ratio"] is None
